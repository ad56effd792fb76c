"""Training regimes: two-stage (storage, then query of the training half) and mixed (both jointly).

Run layout (``run_dir``)::

    data/            tokenizer + dataset.jsonl + base/ (the shared random initialisation)
    two_stage/       checkpoints/step-NNNNNN/ (resumable), stage1/, final/, history.json
    mixed/           checkpoints/step-NNNNNN/, final/, history.json

Determinism: batches are a pure function of (seed, stage, step) and checkpoints hold the optimizer state, so a run
resumed from any checkpoint ends with the same weights as an uninterrupted one (``tests/lab/test_train.py``).

CLI: ``python -m mechrecall.lab.train --preset default --regime mixed --out runs/x`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechrecall.checkpoint import read_meta, save_checkpoint
from mechrecall.facts import facts_file_name
from mechrecall.io import atomic_write_json
from mechrecall.lab.adapters import (
    adapter_state,
    apply_lora,
    is_adapted,
    load_adapter_state,
    merge_adapters,
    merged_copy,
    tie_gradients,
)
from mechrecall.lab.bios import SPLITS, FactDataset, generate
from mechrecall.lab.config import Preset, StageConfig, get_preset
from mechrecall.lab.distributed import Processes, processes, sharded_lm_loss
from mechrecall.lab.evaluate import evaluate
from mechrecall.lab.models import build_model, load_checkpoint, pretrained_base
from mechrecall.lab.tokenizer import train_tokenizer
from mechrecall.lab.trace import GradientTrace
from mechrecall.tokenization import Batch, collate_documents, collate_examples, encode_example

REGIMES = ("two_stage", "mixed", "pre_instruction")


def normalize_regime(regime: str) -> str:
    name = regime.replace("-", "_")
    if name not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of: two-stage, mixed, pre-instruction")
    return name


def stage_plan(preset: Preset, regime: str) -> list[tuple[str, StageConfig]]:
    regime = normalize_regime(regime)
    if regime == "mixed":
        return [("mixed", preset.mixed)]
    if regime == "pre_instruction":
        if preset.pre_instruction is None:
            raise ValueError(f"preset {preset.name!r} has no pre_instruction section (give it with --set)")
        return [("qa", preset.pre_instruction.qa), ("joint", preset.pre_instruction.joint)]
    return [("stage1", preset.two_stage.stage1), ("stage2", preset.two_stage.stage2)]


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class TrainingData:
    """Pre-tokenised training sets: every biography (LM loss) and the training half's QA (answer + EOS loss)."""

    storage: Batch
    query: Batch

    @classmethod
    def build(cls, dataset: FactDataset, tokenizer) -> TrainingData:
        storage = collate_documents(tokenizer, dataset.documents())
        qa = [encode_example(tokenizer, ex) for ex in dataset.query_examples(dataset.pids("train"))]
        return cls(storage, collate_examples(qa, tokenizer.pad_token_id))


def batch_rows(n: int, batch_size: int, step: int, seed: int, stage: int) -> Int[Tensor, " batch"]:
    """Rows of the ``step``-th batch: consecutive slices of per-epoch permutations seeded by (seed, stage, epoch)."""
    ks = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, within = ks // n, ks % n
    rows = torch.empty_like(ks)
    for epoch in epochs.unique().tolist():
        g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 7_919 + epoch)
        perm = torch.randperm(n, generator=g)
        sel = epochs == epoch
        rows[sel] = perm[within[sel]]
    return rows


def lm_loss(model, batch: Batch, *, scored_logits: bool = False) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the scored positions (``labels != -100``).

    ``scored_logits=True`` computes vocabulary logits only at the positions that are scored: the decoder stack
    (:func:`mechrecall.arch.base_model`, final norm included) runs on the whole batch, the unembedding and any logit
    soft-capping on the gathered scored states alone. The loss is the same function; it saves the unembedding's
    matrix products and the ``[batch, pos, vocab]`` logits of every unscored position (a QA row scores only its
    answer and end-of-text, and padding is never scored), which dominate with a large vocabulary (gemma-3's 262,144).
    Float summation order differs from the full-logits path, so a run's last digits do too; hence an option.
    """
    if not scored_logits:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return _cross_entropy(logits, batch)
    from mechrecall.recall import scored_logits as logits_at_scored

    _, _, logits, targets = logits_at_scored(model, batch)
    return F.cross_entropy(logits.float(), targets)


def _cross_entropy(logits: Tensor, batch: Batch) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100)


def lr_at(cfg: StageConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------------------- runs
@dataclass
class StepEvent:
    """Handed to callbacks after the backward pass and before the optimizer step (gradients are populated)."""

    regime: str
    stage: str
    step: int
    global_step: int
    model: nn.Module
    batches: dict[str, Batch]
    losses: dict[str, float]


Callback = Callable[[StepEvent], None]


def prepare_data(preset: Preset, run_dir: str | Path) -> tuple[FactDataset, object]:
    """Generate the dataset, train the tokenizer and build the model (or load the pretrained ``model.source`` and its
    tokenizer) and write ``data/`` (once; later calls reload and verify)."""
    data_dir = Path(run_dir) / "data"
    dataset = generate(preset.data.spec(), preset.seed)
    base = data_dir / "base"
    if base.exists():
        meta = read_meta(base)
        if meta.get("dataset_hash") != dataset.hash:
            raise ValueError(
                f"{data_dir} holds dataset {meta.get('dataset_hash')} but preset {preset.name!r} seed {preset.seed} "
                f"generates {dataset.hash}: use another --out or --force"
            )
        held = (meta.get("config") or {}).get("model", {}).get("source")
        if held != preset.model.source:
            raise ValueError(
                f"{base} was built from model.source={held!r} but the preset asks for {preset.model.source!r}: "
                f"use another --out or --force"
            )
        _, tokenizer, _ = load_checkpoint(base)
        write_facts_file(dataset, data_dir)  # (runs from before the facts file get it)
        return dataset, tokenizer
    if preset.model.source is not None:  # a pretrained base and its own tokenizer
        model, tokenizer = pretrained_base(preset.model.source, dataset)
    else:
        tokenizer = train_tokenizer(dataset, preset.data.name_style)
        model = build_model(preset.model, tokenizer, preset.seed)
    dataset.to_jsonl(data_dir / "dataset.jsonl")
    write_facts_file(dataset, data_dir)
    save_checkpoint(base, model, tokenizer, _meta(preset, dataset, "base", "init", 0, {}))
    return dataset, tokenizer


def write_facts_file(dataset: FactDataset, data_dir: Path) -> Path:
    """``data/facts-<hash>.jsonl``: the run's facts in the toolkit's file format, which any tool finds beside the
    run's checkpoints (:func:`mechrecall.facts.checkpoint_facts`) without the lab's code."""
    path = data_dir / facts_file_name(dataset.hash)
    return path if path.exists() else dataset.factset().to_jsonl(path)


def _meta(preset: Preset, dataset: FactDataset, regime: str, stage: str, step: int, metrics: dict) -> dict:
    return {
        "preset": preset.name,
        "seed": preset.seed,
        "regime": regime,
        "stage": stage,
        "global_step": step,
        "dataset_hash": dataset.hash,
        "config": preset.model_dump(mode="json"),
        "metrics": metrics,
    }


class TamperedStateError(ValueError):
    """A trainer state that holds more than tensors and plain values: refused, never resumed around."""


def load_trainer_state(checkpoint: Path) -> dict:
    """A resumable checkpoint's ``trainer_state.pt``, loaded without running code from it.

    ``weights_only=True`` restricts unpickling to tensors and plain containers (dict, list, tuple, str, numbers), which
    is all a trainer state holds: a crafted file from a run folder someone handed over cannot execute anything, it is
    refused with one line naming it. Memory-mapped: under DDP / FSDP every process reads the same file, and the page
    cache holds it once (a 3B model's AdamW moments are 26 GB: eight private copies would not fit a node's memory).
    """
    path = checkpoint / "trainer_state.pt"
    try:
        state = torch.load(path, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TamperedStateError(f"{path}: refused, it holds more than tensors and plain values ({first})") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise ValueError(f"{path}: not a mechrecall trainer state")
    return state


def _checkpoints(regime_dir: Path) -> list[Path]:
    """The resumable checkpoints of a regime, oldest first."""
    return sorted(regime_dir.glob("checkpoints/step-*"), key=lambda p: int(re.sub(r"\D", "", p.name)))


def _resume_point(regime_dir: Path) -> tuple[Path, nn.Module, dict] | None:
    """(checkpoint, model, trainer state) of the newest checkpoint that reads back whole; None if there is none.

    A newer one that does not (weights or trainer state truncated, say by a full disk) is named in one warning line
    and the previous one is used; its steps are trained again and the broken folder is replaced when they are
    saved. Checkpoints without a trainer state (``keep_states`` pruned it) are skipped. A trainer state that holds
    more than tensors and plain values is refused outright (:func:`load_trainer_state`): that is tampering, not
    wear, and resuming around it would hide it."""
    for path in reversed(_checkpoints(regime_dir)):
        if not (path / "trainer_state.pt").exists():
            continue
        try:
            state = load_trainer_state(path)
            model, _, _ = load_checkpoint(path)
        except TamperedStateError:
            raise
        except ValueError as e:
            reason = str(e).strip().splitlines()[0]
        except Exception as e:  # a torn zip or safetensors file raises whatever its reader raises
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        else:
            return path, model, state
        print(f"warning: {path} does not read back ({reason[:200]}); resuming from the checkpoint before it",
              file=sys.stderr)  # fmt: skip
    return None


def _clean_stale(regime_dir: Path) -> None:
    """Remove the temporaries of interrupted writes (``.NAME.*.tmp`` / ``.NAME.old`` beside checkpoint folders and
    JSON files): the folder's writer holds the run lock, so nothing else can be writing them."""
    for folder in (regime_dir, regime_dir / "checkpoints"):
        for old in folder.glob(".*.old"):  # a kill between atomic_write_dir's two renames: the only whole copy
            target = old.with_name(old.name[1:].removesuffix(".old"))
            if not target.exists():
                os.replace(old, target)
        for stale in [*folder.glob(".*.tmp"), *folder.glob(".*.old")]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- run identity
RUN_FILE = "run.json"
# how a run executes or keeps its checkpoints, not what it computes: may change between resumes
_EXECUTION_KEYS = ("threads", "save_every", "keep_states")


def _fingerprint(preset: Preset, regime: str, autocast: torch.dtype | None) -> dict:
    """What a run computes: its regime, its whole config but execution knobs, and its precision. (Process count and
    sharding are checked against each checkpoint by :func:`_start`, with their own messages.)"""
    config = preset.model_dump(mode="json")
    for key in _EXECUTION_KEYS:
        config.pop(key, None)
    return {"regime": regime, "config": config, "autocast": None if autocast is None else str(autocast)[6:]}


def _differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like values, as ``key: old -> new``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def claim_run(regime_dir: Path, identity: dict, write: bool = True) -> None:
    """Check that a run folder is asked for the run it holds, and record it (``run.json``) when ``write``.

    A regime folder belongs to one run: another config or precision is refused with one line listing the differing
    keys, so that no folder ends as a mix of two runs (process count and sharding are checked against each checkpoint
    when it is resumed). A folder written before run records is compared with the config its newest checkpoint's
    metadata holds (:func:`_legacy_identity`)."""
    path = regime_dir / RUN_FILE
    if path.exists():
        try:
            held = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path}: unreadable run record ({e}): move the folder away or use another --out"
            ) from None
    else:
        held = _legacy_identity(regime_dir, identity)
    if held is not None:
        diff = _differences(held, identity)
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ValueError(
                f"{regime_dir} holds another run ({shown}): use another --out, or --no-resume to replace it"
            )
    if write and not path.exists():
        atomic_write_json(path, identity)


def seed_run(regime_dir: Path, preset: Preset, regime: str, autocast: torch.dtype | None = None) -> None:
    """Claim a regime folder for ``preset``'s run when it was seeded with another run's checkpoint (e.g. a stage-2
    recipe continuing from a copied stage-1 checkpoint): the copied checkpoint's metadata names the other run's
    config, so the folder gets its own record first."""
    atomic_write_json(regime_dir / RUN_FILE, _fingerprint(preset, normalize_regime(regime), autocast))


def _legacy_identity(regime_dir: Path, identity: dict) -> dict | None:
    """The identity of a folder written before run records: the config its newest checkpoint's metadata holds (its
    precision was not recorded and is taken as asked). None for a folder with no checkpoint."""
    for folder in [regime_dir / "final", *reversed(_checkpoints(regime_dir)), regime_dir / "stage1"]:
        try:
            config = json.loads((folder / "mechrecall.json").read_text()).get("config")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(config, dict):
            config = {k: v for k, v in config.items() if k not in _EXECUTION_KEYS}
            return {"regime": identity["regime"], "config": config, "autocast": identity["autocast"]}
    return None


def _lock(regime_dir: Path):
    """An exclusive lock on a regime folder for this process (one writer at a time), or one line if it is held."""
    from filelock import FileLock, Timeout

    regime_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(regime_dir / ".writer.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"{regime_dir} is being trained by another process (lock {lock.lock_file})") from None
    return lock


@dataclass
class _Run:
    """Everything one regime's run carries from step to step (the trainer state is what a checkpoint resumes)."""

    preset: Preset
    regime: str
    regime_dir: Path
    dataset: FactDataset
    tokenizer: object
    data: TrainingData
    model: nn.Module
    state: dict
    t0: float
    tracer: GradientTrace | None
    device: torch.device = torch.device("cpu")
    autocast: torch.dtype | None = None  # mixed precision of the forward (bf16 / fp16); weights stay float32
    procs: Processes = field(default_factory=Processes)  # this process's place in a multi-process launch
    net: nn.Module | None = None  # what forwards run through: the model, or DDP over it under a launch
    params: list = field(default_factory=list)  # what the stage's optimizer updates
    rows: dict = field(default_factory=dict)  # this step's dataset rows per format
    align: object | None = None  # mechrecall.lab.objectives.AlignData while a stage has an alignment term
    align_layers: list = field(default_factory=list)

    def snapshot(self) -> tuple[dict | None, tuple]:
        """(the trace's state for the trainer state, the writers that save it): gathered on the CPU first, which
        under FSDP is a collective every process joins, so that the main process writes plain tensors."""
        if self.tracer is None:
            return None, ()
        state = self.tracer.state()
        return state, (GradientTrace.from_state(state).save,)

    def record_launch(self, meta: dict) -> None:
        """A multi-process checkpoint records its process count and sharding (a resume must match both)."""
        if self.procs.world > 1:
            self.state["world_size"] = meta["processes"] = self.procs.world
            self.state["parallel"] = meta["parallel"] = self.procs.mode


def _fresh_state() -> dict:
    return {
        "stage_index": 0,
        "step": 0,
        "global_step": 0,
        "history": [],
        "metrics": {},
        "optimizer": None,
        "adapter": None,
    }


def _start(preset: Preset, regime: str, run_dir: Path, resume: bool, procs: Processes | None = None) -> _Run:
    """Data, tokenizer and model of a run: from the base checkpoint, or from the newest resumable checkpoint."""
    dataset, tokenizer = prepare_data(preset, run_dir)
    data = TrainingData.build(dataset, tokenizer)
    model, _, _ = load_checkpoint(run_dir / "data" / "base")
    state = _fresh_state()
    regime_dir = run_dir / regime
    found = _resume_point(regime_dir) if resume else None
    if found is not None:
        latest, model, state = found
        procs = procs or Processes()
        saved_world = state.get("world_size", 1)
        if saved_world != procs.world:
            raise ValueError(
                f"{latest} was written by a run of {saved_world} process(es) and this launch has {procs.world}: "
                f"resume with the same number of processes (the shards of each batch depend on it)"
            )
        saved_mode = state.get("parallel", "single" if saved_world == 1 else "ddp")
        if saved_mode != procs.mode:
            raise ValueError(
                f"{latest} was written by a {saved_mode} launch and this one is {procs.mode}: resume it the same way"
            )
    t0 = time.perf_counter() - state.get("seconds", 0.0)
    tracer = GradientTrace.from_state(state.get("trace")) if preset.trace else None
    return _Run(preset, regime, regime_dir, dataset, tokenizer, data, model, state, t0, tracer)


def _stage_optimizer(run: _Run, cfg: StageConfig, stage_index: int, start: int) -> torch.optim.Optimizer:
    """The stage's trainable parameters (LoRA factors or every weight) and its AdamW, restored when resuming. With
    LoRA, ``run.model`` becomes the peft model (the merged model of a resumed checkpoint gets its base weights and
    factors back from the trainer state)."""
    state = run.state
    if cfg.trainable == "lora" and run.procs.fsdp:
        raise ValueError("trainable=lora under FSDP is not supported: launch LoRA stages with DDP (--multi_gpu)")
    if cfg.trainable == "lora":
        trace_base = cfg.trace_base_grads and run.tracer is not None
        run.model, params = apply_lora(run.model, cfg, run.preset.seed + stage_index, trace_base_grads=trace_base)
        if start > 0:
            if state.get("adapter") is None:
                raise ValueError(f"{run.regime_dir}: the checkpoint to resume holds no adapter state for this stage")
            load_adapter_state(run.model, state["adapter"])
    run.net = run.procs.wrap(run.model)  # DDP / FSDP after the stage's adapters are in place, before the optimizer
    if cfg.trainable != "lora":
        params = [p for p in run.model.parameters()]  # (FSDP's sharded parameters replace the originals)
    run.params = params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98), eps=1e-6)
    if start > 0 and state["optimizer"] is not None:
        run.procs.load_optimizer_state(run.model, opt, state["optimizer"])
    return opt


def _step_batches(run: _Run, cfg: StageConfig, stage_index: int, step: int) -> dict[str, Batch]:
    """This step's storage and query batches (a deterministic function of seed, stage and step)."""
    seed, data = run.preset.seed, run.data
    batches: dict[str, Batch] = {}
    shard = run.procs.shard  # every process builds the global batch and keeps its rows (all of them alone)
    if cfg.batch_storage:
        run.rows["storage"] = shard(batch_rows(len(data.storage), cfg.batch_storage, step, seed, 2 * stage_index))
        batches["storage"] = data.storage.index(run.rows["storage"])
    if cfg.batch_query:
        run.rows["query"] = shard(batch_rows(len(data.query), cfg.batch_query, step, seed, 2 * stage_index + 1))
        batches["query"] = data.query.index(run.rows["query"])
    return batches


def _optimizer_step(
    run: _Run, opt, cfg: StageConfig, stage: str, step: int, batches: dict[str, Batch], callbacks: Sequence[Callback]
) -> StepEvent:
    """Forward, backward (one per format when tracing), callbacks, the update and the trace's update record."""
    model, tracer = run.model, run.tracer
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    batches = {fmt: b.to(run.device) for fmt, b in batches.items()}
    weights = {f: cfg.query_weight if f == "query" else 1.0 for f in batches}
    autocast = torch.autocast(run.device.type, dtype=run.autocast, enabled=run.autocast is not None)
    if run.procs.world > 1:
        logged = _sharded_step(run, batches, weights, autocast)
    else:
        logged = {}
        with autocast:
            losses = {}
            for fmt, b in batches.items():
                losses[fmt], parts = _format_loss(run, cfg, fmt, b)
                logged.update(parts)
        if tracer is None:
            sum(losses[f] * weights[f] for f in losses).backward()
            if cfg.trainable == "lora":
                tie_gradients(model)
        else:  # one backward per format so that each format's own gradient can be traced
            for f in losses:
                (losses[f] * weights[f]).backward()
                if cfg.trainable == "lora":
                    tie_gradients(model)
                tracer.capture(f, model)
    event = StepEvent(run.regime, stage, step, run.state["global_step"], model, batches, logged)
    for cb in callbacks:
        cb(event)
    if tracer is not None:
        tracer.before_update(model, run.params)
    opt.step()
    if tracer is not None:
        tracer.record_update(model)
    model.zero_grad(set_to_none=True)  # not opt.zero_grad: traced frozen base weights have gradients too
    return event


def _format_loss(run: _Run, cfg: StageConfig, fmt: str, b: Batch) -> tuple[Tensor, dict[str, float]]:
    """A format's loss for the backward and what to log: the LM loss, plus for the query format the alignment term
    (``align_weight`` > 0; :mod:`mechrecall.lab.objectives`)."""
    if fmt != "query" or not cfg.align_weight:
        loss = lm_loss(run.model, b, scored_logits=run.preset.scored_logits)
        return loss, {fmt: float(loss.detach())}
    from mechrecall.lab.objectives import alignment_term, hidden_at, prompt_end, teacher_states

    out = run.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
    lm = _cross_entropy(out.logits, b)
    states = hidden_at(out.hidden_states, prompt_end(b), run.align_layers)
    facts = run.align.query_fact[run.rows["query"]]
    if cfg.align_teacher == "live":
        teacher = teacher_states(run.model, run.align, run.align_layers, facts)
    else:
        teacher = run.state["align_teacher"][facts]
    align = alignment_term(states, teacher, cfg.align_loss, facts)
    return lm + cfg.align_weight * align, {fmt: float(lm.detach()), "align": float(align.detach())}


def _stage_alignment(run: _Run, cfg: StageConfig, start: int) -> None:
    """Set up a stage's alignment term: the facts, the layers and (``stage_start``) the frozen teacher states, which
    are computed when the stage begins and kept in the trainer state (a resumed stage reads them back)."""
    run.align = None
    if not cfg.align_weight:
        run.state["align_teacher"] = None
        return
    from mechrecall.arch import n_layers
    from mechrecall.lab.objectives import AlignData, default_layers, teacher_states

    if run.procs.world > 1:
        raise ValueError("align_weight: the alignment term runs in single-process training only")
    if not cfg.batch_query:
        raise ValueError("align_weight > 0 needs query batches in the stage (batch_query > 0)")
    if cfg.align_loss == "contrastive" and cfg.batch_query < 2:
        raise ValueError("align_loss contrastive needs batch_query >= 2 (the other facts of a batch are its negatives)")
    layers = list(cfg.align_layers) if cfg.align_layers is not None else default_layers(run.model)
    bad = [lay for lay in layers if not 0 <= lay <= n_layers(run.model)]
    if bad:
        raise ValueError(f"align_layers {bad}: hidden-state indices run from 0 to {n_layers(run.model)}")
    run.align, run.align_layers = AlignData.build(run.dataset, run.tokenizer), layers
    if cfg.align_teacher == "stage_start" and (start == 0 or run.state.get("align_teacher") is None):
        run.state["align_teacher"] = teacher_states(run.model, run.align, layers).cpu()


def _sharded_step(run: _Run, batches: dict[str, Batch], weights: dict[str, float], autocast) -> dict[str, float]:
    """Forward and backward of each format in turn through DDP (a forward per backward, as DDP needs); returns the
    global batch's mean loss per format. The trace captures each format's gradient after its all-reduce."""
    logged = {}
    for f, b in batches.items():
        with autocast:
            loss = sharded_lm_loss(run.net, b, run.procs, scored_logits=run.preset.scored_logits, model=run.model)
        (loss * weights[f]).backward()
        if is_adapted(run.model):
            tie_gradients(run.model)
        if run.tracer is not None:
            run.tracer.capture(f, run.model)
        logged[f] = run.procs.total(float(loss.detach())) / run.procs.world
    return logged


def plateaued(values: list[float], patience: int, delta: float) -> bool:
    """True when the last ``patience`` values do not beat the best before them by more than ``delta``."""
    return len(values) > patience and max(values[-patience:]) <= max(values[:-patience]) + delta


def _log_evaluation(run: _Run, cfg: StageConfig, stage: str, step: int, event: StepEvent) -> bool:
    """Evaluate, append to ``history.json``; True when a stop rule of the stage is met (trained QA reaching
    ``stop_at_trained_qa``, or validation QA on a plateau: :func:`plateaued`)."""
    # held-out numbers are logged for trajectories only; the stop rules read trained and validation QA alone
    m = evaluate(run.model, run.tokenizer, run.dataset, splits=SPLITS if cfg.batch_query else (), storage=True)
    run.procs.after_forwards(run.model)
    entry = {"stage": stage, "step": step, "global_step": run.state["global_step"], "lr": lr_at(cfg, step - 1)}
    entry.update({f"loss_{f}": v for f, v in event.losses.items()})
    entry.update({k: v for k, v in m.items() if k != "per_attribute"})
    run.state["history"].append(entry)
    if run.procs.main:
        atomic_write_json(run.regime_dir / "history.json", run.state["history"])
    if cfg.stop_at_plateau is not None:
        curve = [e["validation_qa"] for e in run.state["history"] if e["stage"] == stage and "validation_qa" in e]
        if plateaued(curve, cfg.stop_at_plateau, cfg.plateau_delta):
            return True
    return cfg.stop_at_trained_qa is not None and m.get("trained_qa", 0.0) >= cfg.stop_at_trained_qa


def _finish_stage(run: _Run, cfg: StageConfig, stage: str, stage_index: int, n_stages: int, step: int, stopped: bool):
    """Merge adapters, evaluate, and write the stage's checkpoint (the stage boundary is resumable too)."""
    if cfg.trainable == "lora":
        run.model = merge_adapters(run.model)
    model, state = run.model, run.state
    model.eval()
    metrics = evaluate(model, run.tokenizer, run.dataset)
    run.procs.after_forwards(model)
    metrics["steps"] = step
    metrics["stopped_early"] = stopped
    state["metrics"][stage] = metrics
    # the next stage starts at step 0 with a fresh optimizer
    state.update(
        stage_index=stage_index + 1, step=0, optimizer=None, adapter=None, align_teacher=None,
        seconds=time.perf_counter() - run.t0,
    )  # fmt: skip
    state["trace"], writers = run.snapshot()
    meta = _meta(run.preset, run.dataset, run.regime, stage, state["global_step"], metrics)
    meta["train_seconds"] = state["seconds"]
    run.record_launch(meta)
    weights = run.procs.full_model_state(model)  # None unless sharded
    name = "final" if stage_index == n_stages - 1 else stage
    if run.procs.main:
        save_checkpoint(run.regime_dir / name, model, run.tokenizer, meta, writers=writers, state_dict=weights)
        if stage_index < n_stages - 1:
            path = run.regime_dir / "checkpoints" / f"step-{state['global_step']:06d}"
            save_checkpoint(path, model, run.tokenizer, meta, state, writers=writers, state_dict=weights)
    run.procs.barrier()


def train(
    preset: Preset,
    regime: str,
    run_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    autocast: str | torch.dtype | None = None,
    gradient_checkpointing: bool = False,
) -> dict:
    """Train one regime into ``run_dir/<regime>`` and return the final checkpoint's metadata (with metrics).

    ``resume`` continues from the newest checkpoint (a finished run is returned as is). ``stop_after`` ends the run
    after that many global steps without writing ``final/`` (simulates an interruption; used by tests).

    ``device`` (default CPU) is where the model trains; ``autocast`` (``"bf16"`` / ``"fp16"``) runs the forward in
    that precision under ``torch.autocast`` with float32 weights, optimizer state and loss; ``gradient_checkpointing``
    recomputes activations in the backward (Hugging Face's, for models larger than memory allows). None of them
    changes the data order or the checkpoints' layout, so a run can resume on another device.
    """
    regime = normalize_regime(regime)
    run_dir = Path(run_dir)
    if preset.threads:
        torch.set_num_threads(preset.threads)
    from mechrecall.devices import resolve_device, resolve_dtype

    dev = torch.device("cpu") if device is None else resolve_device(device)
    amp = None if autocast is None else resolve_dtype(autocast, dev)
    if amp is not None and amp not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast {autocast!r}: choose bf16 or fp16 (the weights stay float32)")
    if amp == torch.float16 and dev.type == "cpu":
        # measured on this project's CPU (micro preset): fp16 autocast ran about 6.5x slower than float32, since
        # CPUs emulate fp16 matmuls; bf16 runs natively where the CPU has AVX-512 BF16 / AMX
        warnings.warn(
            "autocast fp16 on the CPU is emulated (about 6.5x slower than float32 here): use bf16", stacklevel=2
        )
    _check_sizes(preset, regime)
    procs = processes(dev)
    regime_dir = run_dir / regime
    identity = _fingerprint(preset, regime, amp)
    held: dict = {}

    def claim() -> None:
        """The main process's folder work, in an order that loses nothing on bad input: take the writer lock, check
        the run's identity and the shared data/ folder (dataset, model source), and only then replace (--no-resume)
        or clean the folder."""
        held["lock"] = _lock(regime_dir)
        if resume:
            claim_run(regime_dir, identity, write=False)
        prepare_data(preset, run_dir)
        if not resume and regime_dir.exists():  # --no-resume: the folder's old run goes, whole
            for child in regime_dir.iterdir():
                if child.name != ".writer.lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        _clean_stale(regime_dir)

    try:
        procs.on_main(claim)  # every process of a launch raises the main one's error alike (none waits alone)
        if (regime_dir / "final").exists():
            meta = read_meta(regime_dir / "final")
            meta["finished_before"] = True
            return meta
        return _train(preset, regime, run_dir, procs, dev, amp, resume, progress, callbacks, stop_after,
                      gradient_checkpointing, identity)  # fmt: skip
    finally:
        if "lock" in held:
            held["lock"].release()


def _check_sizes(preset: Preset, regime: str) -> None:
    """Refuse a stage that would train on nothing before any work (one line naming the stage's keys)."""
    for stage, cfg in stage_plan(preset, regime):
        if cfg.steps and not (cfg.batch_storage or cfg.batch_query):
            key = "mixed" if regime == "mixed" else f"{regime}.{stage}"
            raise ValueError(f"{key}: batch_storage and batch_query are both 0, so its {cfg.steps} steps train nothing")


def _train(
    preset, regime, run_dir, procs, dev, amp, resume, progress, callbacks, stop_after, gradient_checkpointing, identity
):
    if procs.world > 1:
        dev = procs.accelerator.device
        procs.agree("preset, regime and run folder", f"{preset.model_dump_json()}|{regime}|{run_dir.resolve()}")
        if procs.main:
            prepare_data(preset, run_dir)  # the main process writes data/; the others then read it
        procs.barrier()
    run = _start(preset, regime, run_dir, resume, procs)
    if procs.main:  # the run is valid (data, checkpoint, launch shape): it owns the folder from here
        claim_run(run.regime_dir, identity)
    run.device, run.autocast, run.procs = dev, amp, procs
    run.model.to(dev)
    if gradient_checkpointing:
        run.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    state, plan = run.state, stage_plan(preset, regime)
    for stage_index in range(state["stage_index"], len(plan)):
        stage, cfg = plan[stage_index]
        start = state["step"] if stage_index == state["stage_index"] else 0
        _stage_alignment(run, cfg, start)  # (before adapters: the teacher is the model as the stage begins)
        opt = _stage_optimizer(run, cfg, stage_index, start)
        run.model.train()
        # disable=None: bars only on a terminal (logs and CI get none)
        bar = tqdm(
            total=cfg.steps, initial=start, desc=f"{regime}/{stage}", disable=None if progress else True, leave=False
        )
        step, stopped = start, False
        while step < cfg.steps and not stopped:
            event = _optimizer_step(run, opt, cfg, stage, step, _step_batches(run, cfg, stage_index, step), callbacks)
            step += 1
            state["global_step"] += 1
            bar.update(1)
            bar.set_postfix({f: f"{v:.3f}" for f, v in event.losses.items()})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                stopped = _log_evaluation(run, cfg, stage, step, event)
            stage_done = stopped or step == cfg.steps
            if stop_after is not None and state["global_step"] >= stop_after and not stage_done:
                bar.close()
                _save_resumable(run, opt, cfg, stage, stage_index, step)
                return {"interrupted_at": state["global_step"]}
            if state["global_step"] % preset.save_every == 0 and not stage_done:
                _save_resumable(run, opt, cfg, stage, stage_index, step)
        bar.close()
        _finish_stage(run, cfg, stage, stage_index, len(plan), step, stopped)
    if procs.main:
        atomic_write_json(run.regime_dir / "history.json", state["history"])
    procs.barrier()
    meta = read_meta(run.regime_dir / "final")
    meta["stages"] = state["metrics"]
    return meta


def _save_resumable(run: _Run, opt, cfg: StageConfig, stage: str, stage_index: int, step: int) -> None:
    state, model = run.state, run.model
    optimizer = run.procs.optimizer_state(model, opt)  # (gathered under FSDP: every process takes part)
    state.update(stage_index=stage_index, step=step, optimizer=optimizer, seconds=time.perf_counter() - run.t0)
    state["adapter"] = adapter_state(model) if cfg.trainable == "lora" else None
    state["trace"], writers = run.snapshot()
    meta = _meta(run.preset, run.dataset, run.regime, stage, state["global_step"], {})
    run.record_launch(meta)
    weights = run.procs.full_model_state(model)
    if run.procs.main:
        # with LoRA the HF folder gets merged weights; factors and base weights travel in trainer_state.pt
        saved = merged_copy(model) if cfg.trainable == "lora" else model
        path = run.regime_dir / "checkpoints" / f"step-{state['global_step']:06d}"
        save_checkpoint(path, saved, run.tokenizer, meta, state, writers=writers, state_dict=weights)
        _drop_old_states(run.regime_dir, run.preset.keep_states, state["global_step"])
    run.procs.barrier()


def _drop_old_states(regime_dir: Path, keep: int | None, current: int) -> None:
    """Delete trainer_state.pt from all but the newest ``keep`` checkpoints up to the one just written at step
    ``current`` (their weights stay). Later ones (left by a run that fell back past a broken checkpoint) are not
    counted: they are replaced when their steps are saved again."""
    if keep is None:
        return
    upto = [p for p in _checkpoints(regime_dir) if int(re.sub(r"\D", "", p.name)) <= current]
    for old in upto[:-keep]:
        (old / "trainer_state.pt").unlink(missing_ok=True)


def add_training_device_args(ap: argparse.ArgumentParser) -> None:
    """``--device`` (default CPU: the lab's numbers are CPU numbers), ``--autocast``, ``--gradient-checkpointing``."""
    ap.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:N, mps (default: cpu)")
    ap.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="mixed-precision forward (GPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")


def training_device_kwargs(args: argparse.Namespace) -> dict:
    return {"device": args.device, "autocast": args.autocast, "gradient_checkpointing": args.gradient_checkpointing}


def main(argv: Sequence[str] | None = None) -> int:
    from mechrecall.cli import Parser, check_out

    ap = Parser(prog="python -m mechrecall.lab.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--regime", required=True, help="two-stage or mixed")
    ap.add_argument("--out", required=True, help="run folder (shared by both regimes of one preset and seed)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--blind", action="store_true",
                    help="print validation QA instead of held-out QA at the end (while a choice is still to be made)")  # fmt: skip
    add_training_device_args(ap)
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate an interruption
    args = ap.parse_args(argv)
    try:
        check_out(args.out)
        overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
        preset = get_preset(args.preset, overrides)
        meta = train(preset, args.regime, args.out, resume=not args.no_resume, progress=not args.quiet,
                     stop_after=args.stop_after, **training_device_kwargs(args))  # fmt: skip
        if "interrupted_at" in meta:
            print(f"interrupted after global step {meta['interrupted_at']} (resumable)")
            return 0
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    m = meta["metrics"]
    if meta.get("finished_before"):
        print(f"{Path(args.out) / normalize_regime(args.regime)} already finished this config (preset {meta['preset']}, "
              f"seed {meta['seed']}, {meta['global_step']} steps): nothing trained; its final metrics:")  # fmt: skip
    # --blind: the run's budget or hyperparameters are still to be chosen on the validation people, so the held-out
    # number is not shown (it stays in history.json and final/mechrecall.json, for after the choice)
    shown = f"validation_qa={m['validation_qa']:.3f}" if args.blind else f"heldout_qa={m['heldout_qa']:.3f}"
    print(f"{meta['regime']}: {shown} trained_qa={m['trained_qa']:.3f} storage={m['storage']:.3f} "
          f"({meta.get('train_seconds', 0):.0f}s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
