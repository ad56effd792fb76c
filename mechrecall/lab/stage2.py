"""Stage-2 recipes of the two-stage regime: how much storage recall survives while trained QA is learnt.

Two-stage's held-out failure should not be blamed on forgetting alone, so this module measures the trade-off:
every recipe starts from the same stage-1 checkpoint, trains on the training half's QA, and is evaluated every
``eval_every`` steps on trained QA, storage recall (all people), validation QA and held-out QA. The *selection
rule* uses only trained QA and storage (never held-out or validation people): among recipes whose trained QA
reaches ``target``, pick the one with the highest storage recall at the step where it first does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from mechrecall.io import atomic_write_json
from mechrecall.lab.config import Preset, StageConfig

# name -> stage-2 overrides (relative to the preset's stage 2)
RECIPES: dict[str, dict] = {
    "full-lr1e-3": {"trainable": "all", "lr": 1e-3},
    "full-lr3e-4": {"trainable": "all", "lr": 3e-4},
    "full-lr1e-4": {"trainable": "all", "lr": 1e-4},
    "full-lr1e-3-wd0": {"trainable": "all", "lr": 1e-3, "weight_decay": 0.0},
    "lora-qv-r8": {"trainable": "lora", "lr": 3e-3, "lora_rank": 8, "lora_targets": ["q_proj", "v_proj"]},
    "lora-qv-r8-emb32": {
        "trainable": "lora",
        "lr": 3e-3,
        "lora_rank": 8,
        "lora_targets": ["q_proj", "v_proj"],
        "lora_embedding_rank": 32,
    },
}


def _boundary(run_dir: Path, stage1_steps: int) -> Path:
    """The resumable checkpoint written when stage 1 ended (stage 1 always runs its full budget)."""
    path = run_dir / "two_stage" / "checkpoints" / f"step-{stage1_steps:06d}"
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(
            f"{path}: no stage-1 boundary checkpoint (run the two-stage regime of this preset first)"
        )
    return path


def sweep(
    preset: Preset,
    run_dir: str | Path,
    out: str | Path,
    recipes: Sequence[str] = tuple(RECIPES),
    *,
    steps: int = 400,
    eval_every: int = 25,
    target: float = 0.95,
    progress: bool = False,
) -> dict:
    """Run each recipe from ``run_dir``'s stage-1 checkpoint without early stopping; return curves + the choice."""
    from mechrecall.lab.train import seed_run, train

    run_dir, out = Path(run_dir), Path(out)
    boundary = _boundary(run_dir, preset.two_stage.stage1.steps)
    curves: dict[str, list[dict]] = {}
    for name in recipes:
        if name not in RECIPES:
            raise KeyError(f"unknown stage-2 recipe {name!r}; known: {', '.join(RECIPES)}")
        work = out / name
        if not (work / "two_stage" / "final").exists():
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(run_dir / "data", work / "data")
            shutil.copytree(boundary, work / "two_stage" / "checkpoints" / boundary.name)
        stage2 = StageConfig.model_validate(
            {
                **preset.two_stage.stage2.model_dump(),
                **RECIPES[name],
                "steps": steps,
                "eval_every": eval_every,
                "stop_at_trained_qa": None,
            }
        )
        variant = preset.model_copy(update={"two_stage": preset.two_stage.model_copy(update={"stage2": stage2})})
        if not (work / "two_stage" / "final").exists() and not (work / "two_stage" / "run.json").exists():
            seed_run(work / "two_stage", variant, "two_stage")  # the copied stage-1 checkpoint is the variant's start
        train(variant, "two_stage", work, progress=progress)
        history = json.loads((work / "two_stage" / "history.json").read_text())
        curves[name] = [h for h in history if h["stage"] == "stage2"]
    choice = choose(curves, target)
    result = {
        "target_trained_qa": target,
        "steps": steps,
        "recipes": {n: RECIPES[n] for n in recipes},
        "curves": curves,
        **choice,
    }
    atomic_write_json(out / "stage2_sweep.json", result)
    return result


def choose(curves: dict[str, list[dict]], target: float) -> dict:
    """First point per recipe where trained QA >= target; the chosen recipe keeps the most storage there."""
    reached = {}
    for name, curve in curves.items():
        first = next((h for h in curve if h.get("trained_qa", 0) >= target), None)
        if first is not None:
            reached[name] = first
    best = max(reached, key=lambda n: (reached[n]["storage"], -reached[n]["step"])) if reached else None
    return {"reached": reached, "chosen": best}


def figure(result: dict):
    """Trained QA vs storage recall along each recipe's stage 2 (plotly)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, curve in result["curves"].items():
        fig.add_trace(
            go.Scatter(
                x=[h["trained_qa"] for h in curve],
                y=[h["storage"] for h in curve],
                mode="lines+markers",
                name=name,
                text=[f"step {h['step']}" for h in curve],
            )
        )
    fig.add_vline(x=result["target_trained_qa"], line_dash="dash")
    fig.update_layout(
        title="Two-stage, stage 2: trained QA vs retained storage recall",
        xaxis_title="trained QA (exact match)",
        yaxis_title="storage recall (exact match)",
    )
    return fig
