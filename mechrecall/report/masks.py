"""Shared-update masks of a two-stage / mixed checkpoint pair: statistics, ablation, grafting, JSON + figures.

Importance comes from each checkpoint's training trace (``trace.safetensors``, :mod:`mechrecall.lab.trace`): the
storage mask is the top ``k`` of storage-format importance, the query mask the top ``k`` of query-format importance,
the shared mask their intersection. Ablation resets a mask to the base (pre-fine-tuning) weights of the same model;
grafting copies a regime's shared parameters into the other regime's model (both start from the same base). Every
intervention is compared with size-matched random masks (same count in every matrix, several draws) and with the
format-only masks (storage minus query, query minus storage). Recall is greedy exact-match QA on the held-out people
(measurement only: nothing here is tuned on it) and on the trained people.

Any two checkpoints on your own facts (``facts=``: a fact file, ``datasets.Dataset`` or
:class:`~mechrecall.facts.FactSet`; registry names, folders, Hugging Face ids, GGUF): there is no training trace, so
each format's importance is computed after the fact (``importance=``, recorded in ``masks.json``):

- ``posthoc`` (default without ``base``): mean |per-example answer-loss gradient| of the facts' first text of that
  format on the checkpoint (:func:`mechrecall.masks.posthoc_importance`);
- ``posthoc_x_update`` (default with ``base``): the same times the update size ``|theta_ft - theta_base|``
  (:func:`mechrecall.masks.update_importance`), i.e. the parameters fine-tuning moved that each format's loss is
  sensitive to;
- ``update``: the update size alone, the same map for both formats (their masks coincide: only the ablation is
  informative).

Ablation resets the mask to ``base`` when one is given, else to each matrix's mean over its unmasked entries
(``ablation.mode`` says which). Recall is greedy exact match of the query texts of the facts' ``heldout`` and
``train`` splits (those present; else the first split, or all facts as ``"unsplit"``); ``primary_split`` names the
one the headline drops are measured on. Grafting needs the two checkpoints to share parameter names and shapes (it
is recorded as skipped otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mechrecall import arch
from mechrecall.checkpoint import CheckpointError
from mechrecall.devices import model_device, model_dtype
from mechrecall.facts import FactSet, select_facts
from mechrecall.gradients import gradient_stats
from mechrecall.interventions import ablate, graft, recall_under, state_of, with_random_controls
from mechrecall.io import atomic_write_files, finite
from mechrecall.lab.models import lab_dataset
from mechrecall.lab.trace import GradientTrace
from mechrecall.loading import LoadedModel, load_each, load_model, unique_labels
from mechrecall.masks import (
    MaskComparison,
    block_matrices,
    localize,
    mask_count,
    mask_minus,
    masked_cosines,
    posthoc_importance,
    random_overlap,
    topk_mask,
    update_importance,
)
from mechrecall.report.analysis import (
    NOT_A_SHARED_BASE_TEST,
    Analysis,
    PairContext,
    check_labels,
    from_scratch,
    labels_of,
    versus,
)
from mechrecall.tokenization import check_tokenization

SPLITS = ("heldout", "train")
POINTS = 100.0  # drops are reported in percentage points of exact-match recall
IMPORTANCES = ("posthoc", "posthoc_x_update", "update")


def base_source(loaded: LoadedModel, registry=None) -> str:
    """The base checkpoint of a lab checkpoint: its registry entry's ``base_model``, else ``<run>/data/base``."""
    return base_of(loaded.source, loaded.location, registry)


def base_of(source: str, location: str | Path, registry=None) -> str:
    """:func:`base_source` of a checkpoint not loaded: its name (or path) and its folder."""
    from mechrecall.registry import RegistryError, resolve

    try:
        _, entry = resolve(source, registry)
        if entry is not None and entry.base_model:
            return entry.base_model
    except RegistryError:
        pass
    guess = Path(location).parents[1] / "data" / "base"
    if guess.is_dir():
        return str(guess)
    raise CheckpointError(f"cannot tell the base checkpoint of {source!r}: pass base= explicitly")


def comparison(trace: GradientTrace, k: float, *, kind: str = "abs_grad", scope: str = "per_matrix") -> MaskComparison:
    return MaskComparison(
        topk_mask(trace.importance("storage", kind), k, scope=scope),
        topk_mask(trace.importance("query", kind), k, scope=scope),
        k,
    )


def _drop(before: dict, after: dict) -> dict:
    return {s: POINTS * (before[s] - after[s]) for s in before}


def _consistency_split(loaded: LoadedModel, dataset, shared, n_facts: int, chunk: int | None = None) -> dict:
    """Gradient cosine of the same held-out fact's two formats inside the shared set and outside it.

    ``dataset``: a lab dataset (its held-out people) or a pair ``(storage, query)`` of aligned example lists;
    ``chunk`` facts at a time (default: all at once; per-example gradients of a large model need a few).
    """
    from mechrecall.gradients import answer_batch, per_example_grads

    if isinstance(dataset, tuple):
        storage, query = dataset
    else:
        pids = dataset.pids("heldout")
        storage, query = dataset.storage_examples(pids), dataset.query_examples(pids, templates=[0])
    storage, query = storage[:n_facts], query[:n_facts]
    model = loaded.model
    params = {n: p.detach() for n, p in model.named_parameters() if n in shared}
    step = chunk or len(storage)
    parts: dict[str, list] = {"inside": [], "outside": []}
    for i in range(0, len(storage), step):
        gs = per_example_grads(model, answer_batch(loaded.tokenizer, storage[i : i + step]), params)
        gq = per_example_grads(model, answer_batch(loaded.tokenizer, query[i : i + step]), params)
        for w, c in masked_cosines(gs, gq, shared).items():
            parts[w].append(c.cpu())
        del gs, gq
    cos = {w: torch.cat(v) for w, v in parts.items()}
    return {w: {"mean_cos": float(c.mean()), "per_fact": c.tolist()} for w, c in cos.items()}


@dataclass
class _Pair:
    """What every measurement of a masks run shares: the two models (reference first), their weights, the base
    weights, the facts recall is measured on and how, the controls' sizes and seeds; random controls are cached."""

    models: dict[str, LoadedModel]
    masks: dict[str, Callable[[float], MaskComparison]]  # label -> k -> the storage / query masks
    recall_facts: FactSet
    splits: tuple[str, ...]
    base_sd: dict | None
    consistency: tuple[object, int | None]  # what _consistency_split takes: a lab dataset or example lists; chunk
    draws: int = 5
    sweep_draws: int = 2
    consistency_facts: int = 64
    seed: int = 0
    ks: Sequence[float] = ()
    states: dict = field(init=False)
    graft_block: str | None = field(init=False)
    _controls: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.states = {r: state_of(m.model) for r, m in self.models.items()}
        first, second = (m.model for m in self.models.values())
        self.graft_block = _graftable(first, second)

    @property
    def primary(self) -> str:
        return self.splits[0]

    @property
    def mode(self) -> str:
        return "base" if self.base_sd is not None else "mean"

    def other(self, label: str) -> str:
        return next(r for r in self.models if r != label)

    def ablated(self, state: dict, mask) -> dict:
        return ablate(state, mask, self.mode, self.base_sd)

    def recall(self, label: str, state: dict | None = None) -> dict:
        m = self.models[label]
        return recall_under(m.model, m.tokenizer, self.recall_facts, self.states[label] if state is None else state,
                            self.splits)  # fmt: skip

    def controls(self, what: str, label: str, k: float, mask, make_state, seed: int, draws: int, donor=None) -> dict:
        """A mask and its size-matched random controls on ``label``'s model, once per (what, model, k, draws, seed);
        grafting into the donor itself is a no-op (its own recall, no spread)."""
        m = self.models[label]
        key = (what, id(m.model), k, draws, seed)
        if key not in self._controls:
            if what == "graft" and donor is m.model:
                own = self.recall(label)
                self._controls[key] = {"mask": own, "random": {s: [own[s]] * draws for s in self.splits},
                                       "random_mean": dict(own), "random_std": dict.fromkeys(self.splits, 0.0),
                                       "n": mask_count(mask)}  # fmt: skip
            else:
                self._controls[key] = with_random_controls(m.model, m.tokenizer, self.recall_facts, mask, make_state,
                                                           draws=draws, seed=seed, splits=self.splits)  # fmt: skip
        return self._controls[key]


def _entry(pair: _Pair, label: str, k: float) -> dict:
    """One model's masks at ``k``: their statistics and heads, its recall, ablation, grafting into the other model,
    gradient consistency inside / outside the shared set, and the sweep over ``pair.ks``."""
    loaded = pair.models[label]
    comp = pair.masks[label](k)
    with np.errstate(invalid="ignore"):  # layers outside a masks run's ``layers`` rank nothing: 0 / 0, written null
        entry = {"source": loaded.source, **comp.stats(loaded.model.config)}
        loc = localize(comp.shared, loaded.model.config)
        entry["heads_fraction"] = (loc["heads"] / loc["heads_total"]).tolist()
    intact = pair.recall(label)
    entry["recall"] = intact
    entry["ablation"] = _ablation(pair, label, comp, k, intact)
    entry["grafting"] = _grafting(pair, label, comp.shared, k, intact)
    data, chunk = pair.consistency
    entry["consistency"] = _consistency_split(loaded, data, comp.shared, pair.consistency_facts, chunk=chunk)
    entry["sweep"] = _sweep(pair, label, intact[pair.primary])
    return entry


def _ablation(pair: _Pair, label: str, comp: MaskComparison, k: float, intact: dict) -> dict:
    """Recall after resetting the shared set (base weights, or each matrix's mean), against random masks of the same
    size and the format-only sets."""
    p = pair.primary
    abl = pair.controls("ablation", label, k, comp.shared, lambda m: pair.ablated(pair.states[label], m), pair.seed,
                        pair.draws)  # fmt: skip
    only = {"storage_only": mask_minus(comp.storage, comp.query), "query_only": mask_minus(comp.query, comp.storage)}
    fmt_only = {name: pair.recall(label, pair.ablated(pair.states[label], m)) for name, m in only.items()}
    out = {
        "mode": pair.mode,
        "shared_drop": _drop(intact, abl["mask"])[p],
        "random_drop_mean": POINTS * (intact[p] - abl["random_mean"][p]),
        "random_drop_std": POINTS * abl["random_std"][p],
        "random_drops": [POINTS * (intact[p] - v) for v in abl["random"][p]],
        "drops_per_split": _drop(intact, abl["mask"]),
        "format_only_drops": {name: _drop(intact, r) for name, r in fmt_only.items()},
        "format_only_counts": {name: mask_count(m) for name, m in only.items()},
        "n_masked": abl["n"],
    }
    if "train" in pair.splits and p != "train":  # the trained people too (a lab pair)
        out["trained_shared_drop"] = _drop(intact, abl["mask"])["train"]
        out["trained_random_drop_mean"] = POINTS * (intact["train"] - abl["random_mean"]["train"])
    return out


def _grafting(pair: _Pair, label: str, shared, k: float, intact: dict) -> dict:
    """The other model's recall after it receives this model's shared parameters, against random masks."""
    recipient, p = pair.other(label), pair.primary
    if pair.graft_block is not None:
        return {"recipient": recipient, "skipped": pair.graft_block}
    donor, target = pair.models[label].model, pair.models[recipient].model
    before = intact if target is donor else pair.recall(recipient)
    gr = pair.controls("graft", recipient, k, shared, lambda m: graft(pair.states[recipient], pair.states[label], m),
                       pair.seed + 100, pair.draws, donor=donor)  # fmt: skip
    out = {
        "recipient": recipient,
        "heldout_before": before[p],
        "heldout_after": gr["mask"][p],
        "random_heldout_mean": gr["random_mean"][p],
        "random_heldout_std": gr["random_std"][p],
        "random_heldout": gr["random"][p],
        "donor_heldout": intact[p],
    }
    if "train" in pair.splits and p != "train":
        out |= {"trained_before": before["train"], "trained_after": gr["mask"]["train"]}
    return out


def _sweep(pair: _Pair, label: str, intact: float) -> list[dict]:
    """Shared-set size, ablation and grafting over the mask sizes ``pair.ks`` (``sweep_draws`` random controls)."""
    recipient = pair.other(label) if pair.graft_block is None else None
    donor = pair.models[label].model
    rows = []
    for kk in pair.ks:
        comp = pair.masks[label](kk)
        st = comp.stats()
        abl = pair.controls("ablation", label, kk, comp.shared, lambda m: pair.ablated(pair.states[label], m),
                            pair.seed, pair.sweep_draws)  # fmt: skip
        row = {
            "k": kk,
            "shared_fraction": st["shared_fraction"],
            "jaccard": st["jaccard"],
            "random_shared_fraction": random_overlap(st["storage_fraction"], st["query_fraction"])["shared_fraction"],
            "ablation_shared_drop": POINTS * (intact - abl["mask"][pair.primary]),
            "ablation_random_drop_mean": POINTS * (intact - abl["random_mean"][pair.primary]),
        }
        if recipient is not None:
            gr = pair.controls("graft", recipient, kk, comp.shared,
                               lambda m: graft(pair.states[recipient], pair.states[label], m), pair.seed + 100,
                               pair.sweep_draws, donor=donor)  # fmt: skip
            row["graft_heldout"] = gr["mask"][pair.primary]
            row["graft_random_heldout_mean"] = gr["random_mean"][pair.primary]
        rows.append(row)
    return rows


def _graftable(a, b) -> str | None:
    """Why ``b``'s parameters cannot be grafted into ``a`` (names or shapes differ), or None."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        return f"the checkpoints have different parameters (e.g. {sorted(set(pa) ^ set(pb))[0]!r})"
    bad = next((n for n in pa if pa[n].shape != pb[n].shape), None)
    return None if bad is None else f"{bad!r} has shape {tuple(pa[bad].shape)} vs {tuple(pb[bad].shape)}"


def _recall_splits(facts: FactSet, fmt: str = "query") -> tuple[FactSet, tuple[str, ...]]:
    """Facts for recall (those without a split as ``"unsplit"``; with ``fmt="storage"`` each fact's first storage
    text stands in for its query texts, scored without end-of-text) and the splits to measure, primary first."""
    if fmt not in ("query", "storage"):
        raise ValueError(f"recall format {fmt!r}: expected 'query' or 'storage'")
    if fmt == "storage":
        facts = FactSet([replace(f, query=f.storage[:1]) for f in facts], facts.source)
    if any(f.split is None for f in facts):
        facts = FactSet([f if f.split is not None else replace(f, split="unsplit") for f in facts], facts.source)
    present = facts.splits
    return facts, tuple(s for s in SPLITS if s in present) or (present[0],)


def run(
    two_stage: str,
    mixed: str,
    out: str | Path,
    *,
    base: str | None = None,
    registry: str | Path | None = None,
    k: float = 0.05,
    ks: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    draws: int = 5,
    sweep_draws: int = 2,
    kind: str = "abs_grad",
    scope: str = "per_matrix",
    consistency_facts: int = 64,
    seed: int = 0,
    facts=None,
    labels: Sequence[str] | None = None,
    device=None,
    dtype=None,
    **facts_options,
) -> dict:
    """Masks of a lab pair from its training traces; with ``facts`` of any two checkpoints (:func:`run_facts`, which
    takes the further ``facts_options``: ``split``, ``count``, ``importance``, ``batch_size``, ``layers``,
    ``recall_format``)."""
    sizes = dict(k=k, ks=ks, draws=draws, sweep_draws=sweep_draws, scope=scope, consistency_facts=consistency_facts,
                 seed=seed, labels=labels, device=device, dtype=dtype, base=base, registry=registry)  # fmt: skip
    if facts is not None:
        return run_facts(two_stage, mixed, out, facts, **sizes, **facts_options)
    if facts_options:
        raise ValueError(f"{', '.join(facts_options)}: options of a masks run on a fact file (give --facts / facts=)")
    first, second = check_labels(labels, 2) or ("two_stage", "mixed")  # a lab pair's keys: its regimes, or renamed
    models = {r: load_model(src, registry=registry, device=device, dtype=dtype, supported_only=True)
              for r, src in ((first, two_stage), (second, mixed))}  # fmt: skip
    dataset = lab_dataset(models[second])
    if models[first].meta.get("dataset_hash") != dataset.hash:
        raise CheckpointError(f"{two_stage!r} and {mixed!r} were trained on different datasets")
    base_loaded = load_model(base or base_source(models[second], registry), registry=registry, device=device,
                             dtype=dtype)  # fmt: skip
    traces = {r: GradientTrace.load(m.location) for r, m in models.items()}
    masks = {r: (lambda kk, t=t: comparison(t, kk, kind=kind, scope=scope)) for r, t in traces.items()}
    pair = _Pair(models, masks, dataset.factset(), SPLITS, state_of(base_loaded.model), (dataset, None), draws=draws,
                 sweep_draws=sweep_draws, consistency_facts=consistency_facts, seed=seed, ks=ks)  # fmt: skip
    result: dict = {"k": k, "importance": f"trace:{kind}", "scope": scope, "units": "held-out QA percentage points"}
    if (first, second) != ("two_stage", "mixed"):
        result["labels"] = [first, second]
    result["dataset_hash"] = dataset.hash
    result["from_scratch"] = from_scratch(models[second].meta)  # (its graft caption then says what it cannot test)
    result |= {label: _entry(pair, label, k) for label in models}
    config = models[second].model.config
    atomic_write_files(out, {"masks.json": result, "masks.html": figures_html(result, config)})
    return result


class _Posthoc:
    """Post-hoc importance of each format on each model (``importance``: posthoc, posthoc_x_update or update),
    computed once per model, and the masks it ranks at any ``k``."""

    def __init__(self, facts: FactSet, importance: str, base_sd, scope, layers, batch_size):
        self.examples = {fmt: facts.examples(fmt, templates=[0]) for fmt in ("storage", "query")}
        self.importance, self.base_sd, self.scope, self.layers, self.batch_size = (importance, base_sd, scope, layers,
                                                                                   batch_size)  # fmt: skip
        self._imp: dict[str, dict] = {}
        self._masks: dict[tuple, MaskComparison] = {}

    def include(self, model) -> Callable[[str], bool]:
        wanted = None if self.layers is None else set(self.layers)
        return lambda n: block_matrices(n) and (wanted is None or arch.layer_of(n, model) in wanted)

    def of(self, lm: LoadedModel) -> dict:
        if lm.source not in self._imp:
            include = self.include(lm.model)
            selected = {n: p for n, p in state_of(lm.model).items() if include(n)}
            if not selected:
                raise ValueError(
                    f"--layers {list(self.layers)}: no attention / MLP weight matrix of {lm.source} is there"
                )
            base = self.base_sd
            upd = update_importance({n: base[n] for n in selected}, selected) if base is not None else None
            per = {}
            for fmt, ex in self.examples.items():
                if self.importance == "update":
                    per[fmt] = upd
                    continue
                if self.layers is None:
                    g = posthoc_importance(lm.model, lm.tokenizer, ex, batch_size=self.batch_size)
                else:  # the same mean |per-example gradient|, for the selected matrices only
                    g = gradient_stats(lm.model, lm.tokenizer, ex, params=selected, batch_size=self.batch_size).mean_abs
                per[fmt] = {n: g[n].cpu() * (1 if upd is None else upd[n].cpu()) for n in selected}
            self._imp[lm.source] = per
        return self._imp[lm.source]

    def masks(self, lm: LoadedModel) -> Callable[[float], MaskComparison]:
        def at(k: float) -> MaskComparison:
            if (lm.source, k) not in self._masks:
                imp, include = self.of(lm), self.include(lm.model)
                self._masks[lm.source, k] = MaskComparison(
                    topk_mask(imp["storage"], k, scope=self.scope, include=include),
                    topk_mask(imp["query"], k, scope=self.scope, include=include),
                    k,
                )
            return self._masks[lm.source, k]

        return at


IMPORTANCE_DETAIL = {
    "posthoc": "mean |per-example answer-loss gradient| per format (mechrecall.masks.posthoc_importance)",
    "posthoc_x_update": "posthoc importance x |theta_ft - theta_base| (mechrecall.masks.update_importance)",
    "update": "|theta_ft - theta_base|, the same for both formats",
}


def _check_importance(importance: str | None, base: str | None) -> str:
    importance = importance or ("posthoc_x_update" if base else "posthoc")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance {importance!r}: expected one of {', '.join(IMPORTANCES)}")
    if importance != "posthoc" and base is None:
        raise ValueError(f"importance {importance!r} needs --base (the checkpoint before fine-tuning)")
    return importance


def _facts_pair(first, second, fs: FactSet, *, base, registry, labels, device, dtype, importance, scope, layers,
                batch_size, recall_format, **sizes) -> _Pair:  # fmt: skip
    """Load the pair (and ``base``), check the facts tokenize on both and that ``base`` matches, and build the
    :class:`_Pair` with post-hoc masks."""
    names = check_labels(labels, 2) or unique_labels([first, second])
    sources = (first, second, *([base] if base else []))
    cache = dict(zip(sources, load_each(sources, registry=registry, device=device, dtype=dtype)))  # twice: once
    models = {names[0]: cache[first], names[1]: cache[second]}
    for lm in models.values():
        check_tokenization(fs, lm.tokenizer, ("subject", "final"), lm.source)
        why = _graftable(lm.model, cache[base].model) if base else None
        if why:
            raise CheckpointError(f"--base {base!r} does not match {lm.source!r}: {why}")
    base_sd = state_of(cache[base].model) if base else None
    posthoc = _Posthoc(fs, importance, base_sd, scope, layers, batch_size)
    recall_facts, splits = _recall_splits(fs, recall_format)
    cons = fs.split(splits[0]) if splits[0] in fs.splits else fs
    examples = (cons.examples("storage", templates=[0]), cons.examples("query", templates=[0]))
    return _Pair(models, {r: posthoc.masks(m) for r, m in models.items()}, recall_facts, splits, base_sd,
                 (examples, batch_size), **sizes)  # fmt: skip


def run_facts(
    first: str,
    second: str,
    out: str | Path,
    facts,
    *,
    base: str | None = None,
    registry=None,
    k: float = 0.05,
    ks: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    draws: int = 5,
    sweep_draws: int = 2,
    scope: str = "per_matrix",
    consistency_facts: int = 64,
    seed: int = 0,
    split: str | None = None,
    count: int | None = None,
    labels: Sequence[str] | None = None,
    importance: str | None = None,
    device=None,
    dtype=None,
    batch_size: int = 4,
    layers: Sequence[int] | None = None,
    recall_format: str = "query",
) -> dict:
    """Shared-update masks of any two checkpoints on ``facts`` with post-hoc importance (module docstring).

    ``layers`` ranks only the block matrices of those layers (cheaper: gradients, rankings, random controls and
    interventions all shrink with it). ``recall_format="storage"`` measures recall on the facts' first storage texts
    instead of their query texts (query-format exact match includes end-of-text after the answer, which a chat model
    prompted without its template seldom predicts). The same checkpoint given twice is measured once (its entries
    are equal; grafting it into itself changes nothing)."""
    importance = _check_importance(importance, base)
    fs = select_facts(facts, split, count)
    pair = _facts_pair(first, second, fs, base=base, registry=registry, labels=labels, device=device, dtype=dtype,
                       importance=importance, scope=scope, layers=layers, batch_size=batch_size,
                       recall_format=recall_format, draws=draws, sweep_draws=sweep_draws,
                       consistency_facts=consistency_facts, seed=seed, ks=ks)  # fmt: skip
    first_lm = next(iter(pair.models.values()))
    result: dict = {"k": k, "importance": importance, "importance_detail": IMPORTANCE_DETAIL[importance],
                    "scope": scope, "units": f"{pair.primary} {'QA' if recall_format == 'query' else 'storage'} "
                    f"recall, percentage points", "recall_format": recall_format, "facts": fs.source,
                    "n_facts": len(fs), "primary_split": pair.primary, "splits": list(pair.splits), "base": base,
                    "labels": list(pair.models), "device": str(model_device(first_lm.model)),
                    "dtype": str(model_dtype(first_lm.model)).removeprefix("torch.")}  # fmt: skip
    if layers is not None:
        result["layers"] = sorted(set(layers))
    for label, loaded in pair.models.items():
        twin = next((r for r in pair.models if r in result and result[r]["source"] == loaded.source), None)
        if twin is None:
            result[label] = _entry(pair, label, k)
        else:  # the same checkpoint again: the same numbers, grafting into itself is a no-op
            result[label] = {**result[twin], "grafting": {**result[twin]["grafting"], "recipient": pair.other(label)},
                             "same_checkpoint_as": twin}  # fmt: skip
    result = finite(result)  # layers outside ``layers`` have no ranked parameters: 0 / 0
    atomic_write_files(out, {"masks.json": result, "masks.html": figures_html(result, first_lm.model.config)})
    return result


def figures(result: dict, config=None) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    regimes = [r for r in result.get("labels", ("two_stage", "mixed")) if r in result]
    size = go.Figure()
    for r in regimes:
        sw = result[r]["sweep"]
        size.add_trace(go.Scatter(x=[s["k"] for s in sw], y=[s["shared_fraction"] for s in sw], name=f"{r} shared"))
    sw = result[regimes[0]]["sweep"]
    size.add_trace(
        go.Scatter(x=[s["k"] for s in sw], y=[s["random_shared_fraction"] for s in sw], name="random expectation",
                   line={"dash": "dash"})
    )  # fmt: skip
    size.update_layout(title="Shared-update set size vs k", xaxis_title="k (top fraction per format)",
                       yaxis_title="shared fraction of block parameters", xaxis_type="log", yaxis_type="log")  # fmt: skip

    n_layers = len(result[regimes[0]]["per_layer_fraction"])
    heat = make_subplots(rows=1, cols=len(regimes), subplot_titles=[f"{r}: shared fraction per head" for r in regimes])
    for i, r in enumerate(regimes):
        heat.add_trace(
            go.Heatmap(z=result[r]["heads_fraction"], y=[f"L{L}" for L in range(n_layers)], coloraxis="coloraxis"),
            row=1, col=i + 1,
        )  # fmt: skip
    heat.update_layout(
        title=f"Where the shared set lies (k={result['k']}): attention heads", coloraxis={"colorscale": "Viridis"}
    )

    abl = go.Figure()
    for r in regimes:
        sw = result[r]["sweep"]
        abl.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["ablation_shared_drop"] for s in sw], name=f"{r}: shared")
        )
        abl.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["ablation_random_drop_mean"] for s in sw], name=f"{r}: random",
                       line={"dash": "dash"})
        )  # fmt: skip
    how = "reset to base" if result[regimes[0]]["ablation"]["mode"] == "base" else "set to the matrix mean"
    which = result.get("primary_split", "heldout").replace("heldout", "held-out")
    abl.update_layout(title=f"Ablation ({how}): {which} QA drop", xaxis_title="k", yaxis_title="drop (points)",
                      xaxis_type="log")  # fmt: skip

    gr = go.Figure()
    for r in regimes:
        if "skipped" in result[r]["grafting"]:
            continue
        sw = result[r]["sweep"]
        rec = result[r]["grafting"]["recipient"]
        gr.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["graft_heldout"] for s in sw], name=f"{r} shared -> {rec}")
        )
        gr.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["graft_random_heldout_mean"] for s in sw],
                       name=f"random -> {rec}", line={"dash": "dash"})
        )  # fmt: skip
    gr.update_layout(
        title=f"Grafting: recipient's {which} QA", xaxis_title="k", yaxis_title=f"{which} QA", xaxis_type="log"
    )
    return [size, heat, abl, gr]


def figures_html(result: dict, config=None) -> str:
    from mechrecall.plotting import page

    return page(figures(result, config), "mechrecall masks")


def summary_rows(result: dict) -> list[str]:
    """Markdown rows for results.md."""
    lines = ["| regime | shared fraction | random expectation | Jaccard | ablation drop: shared | random (mean ± sd) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    regimes = list(result.get("labels", ("two_stage", "mixed")))
    for r in regimes:
        e = result[r]
        a = e["ablation"]
        lines.append(
            f"| {r} | {e['shared_fraction']:.4f} | {e['random_expectation']['shared_fraction']:.4f} | {e['jaccard']:.3f} "
            f"| {a['shared_drop']:.1f} | {a['random_drop_mean']:.1f} ± {a['random_drop_std']:.1f} |"
        )
    donor = regimes[-1]
    g = result[donor]["grafting"]
    lines.append("")
    if "skipped" in g:
        lines.append(f"Grafting skipped: {g['skipped']}")
        return lines
    lab = "primary_split" not in result  # a lab pair (its keys may be renamed regimes)
    into = g["recipient"].replace("_", "-") if lab else g["recipient"]
    which = "held-out QA" if lab else f"{result['primary_split']} {result.get('recall_format', 'query')} recall"
    lines.append(
        f"Grafting {donor}'s shared set into {into}: {which} {g['heldout_before']:.3f} -> {g['heldout_after']:.3f} "
        f"(random masks of the same size: {g['random_heldout_mean']:.3f} ± {g['random_heldout_std']:.3f}; "
        f"{donor} itself {g['donor_heldout']:.3f})"
    )
    return lines


def captioned(masks: dict) -> list[tuple]:
    """Finding 3 for the page (shared sets, where they lie, ablation, grafting), captioned for the pair."""
    first, second = labels_of(masks)
    size, heat, abl, gr = figures(masks)
    m, t = masks[second], masks[first]
    size_caption = (
        f"Finding 3, shared-update parameters: the top-k fraction of block weights by each format's importance "
        f"({masks['importance']}), intersected. At k = {masks['k']}: {second} {m['shared_fraction']:.4f} vs {first} "
        f"{t['shared_fraction']:.4f} of block weights (random overlap {m['random_expectation']['shared_fraction']:.4f}). "
        + versus(m["shared_fraction"], t["shared_fraction"], "the shared set is much larger under mixed training")
    )
    heat_caption = ("Where the shared set lies: fraction of each attention head's parameters (q/o slices plus its "
                    "key/value head's share) that are shared, per layer.")  # fmt: skip
    a = m["ablation"]
    abl_caption = (
        f"Ablation: resetting {second}'s shared set ({a['mode']}). At k = {masks['k']} its recall drops "
        f"{a['shared_drop']:.1f} points vs {a['random_drop_mean']:.1f} ± {a['random_drop_std']:.1f} for size-matched "
        f"random masks. "
        + versus(a["shared_drop"], a["random_drop_mean"],
                 "ablating the shared set breaks held-out recall (more than random masks)", 2 * a["random_drop_std"])
    )  # fmt: skip
    out = [(size, size_caption), (heat, heat_caption), (abl, abl_caption)]
    g = m["grafting"]
    if "skipped" not in g:
        gr_caption = (
            f"Grafting {second}'s shared parameters into {g['recipient']}: recall {g['heldout_before']:.3f} -> "
            f"{g['heldout_after']:.3f} (random masks {g['random_heldout_mean']:.3f} ± {g['random_heldout_std']:.3f}). "
            + (NOT_A_SHARED_BASE_TEST if masks.get("from_scratch") else
               versus(g["heldout_after"], g["random_heldout_mean"], "grafting the shared set transfers held-out recall",
                      2 * g["random_heldout_std"]))
        )  # fmt: skip
        out.append((gr, gr_caption))
    return out


def run_pair(first: str, second: str, out, *, registry=None, labels=None, context: PairContext = PairContext()):
    """The masks of a training pair: from the training traces, or (a preset trained without one) post-hoc importance
    on the run's own facts against its starting checkpoint ``context.base``."""
    kw = ANALYSIS.sizes(context)
    preset = context.preset
    if preset is not None and not preset.trace:
        from mechrecall.lab.bios import generate

        kw.update(facts=generate(preset.data.spec(), preset.seed).factset(), split="heldout", base=context.base)
    else:  # the training traces rank the parameters: no fact-file options
        kw.pop("count", None)
    return run(first, second, out, registry=registry, labels=labels, **kw)


ANALYSIS = Analysis(
    name="masks",
    output="masks.json",
    order=20,
    captioned=captioned,
    run_pair=run_pair,
    summary=summary_rows,
    title=lambda result: f"Shared-update masks (k = {result['k']}, recall drops in points)",
    pretrained_sizes={"count": 120, "consistency_facts": 24, "draws": 3, "sweep_draws": 1, "ks": (0.01, 0.05, 0.2)},
)
