"""Does early cross-format consistency predict which runs will generalize? (beyond the paper: early prediction)

    python analyses/predict_generalization.py --out runs/predict [--preset micro] [--fractions 0.1 0.25]

Trains a grid of lab runs that differ in what should matter (regime, the query share of mixed batches, weight decay,
the stage-2 learning rate, the data seed; :data:`GRID`). Each run is interrupted at fixed fractions of its budget
(the trainer's resumable checkpoints), measured there, and resumed to the end. At each fraction, on the
*validation* people: gradient consistency (mean cosine of same-fact storage/query answer-loss gradients minus the
mismatched-fact baseline) and representation consistency (last-layer same-fact minus mismatched cosine at the subject
and final tokens); and the obvious baselines: the training loss over the run's own training data and the trained-QA
exact match at that point. The target is the run's final held-out QA (measurement only: nothing is chosen by it).
Writes ``predict.json`` (every run's numbers, each predictor's Spearman rho with a bootstrap interval, and its |rho|
against each baseline's) and ``predict.html`` (one scatter per predictor). A finished run is reused, so an
interrupted grid resumes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from mechrecall.cli import Parser, at_least, check_out, fraction, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (regime, overrides on the preset)
GRID: dict[str, tuple[str, list[str]]] = {
    "mixed": ("mixed", []),
    "mixed-q8": ("mixed", ["mixed.batch_query=8"]),
    "mixed-q16": ("mixed", ["mixed.batch_query=16"]),
    "mixed-q64": ("mixed", ["mixed.batch_query=64"]),
    "mixed-wd0.1": ("mixed", ["mixed.weight_decay=0.1"]),
    "mixed-wd0": ("mixed", ["mixed.weight_decay=0.0"]),
    "mixed-seed1": ("mixed", ["seed=1"]),
    "two-stage": ("two_stage", []),
    "two-stage-lr3e-4": ("two_stage", ["two_stage.stage2.lr=3e-4"]),
    "two-stage-lr3e-3": ("two_stage", ["two_stage.stage2.lr=3e-3"]),
    "two-stage-seed1": ("two_stage", ["seed=1"]),
    "pre-instruction": ("pre_instruction", []),
}
PREDICTORS = ("grad_margin", "rep_subject_margin", "rep_final_margin")
BASELINES = ("train_loss", "trained_qa")


def _budget(preset, regime: str) -> int:
    from mechrecall.lab.train import stage_plan

    return sum(cfg.steps for _, cfg in stage_plan(preset, regime))


@torch.no_grad()
def _train_loss(model, tokenizer, dataset, cfg_formats: tuple[str, ...]) -> float:
    """Mean LM loss over the run's training data (biographies and/or trained QA), in batches of 64."""
    from mechrecall.lab.train import TrainingData, lm_loss
    from mechrecall.recall import row_chunks

    data = TrainingData.build(dataset, tokenizer)
    total, count = 0.0, 0
    for fmt in cfg_formats:
        batch = getattr(data, fmt)
        for rows in row_chunks(len(batch), 64):
            sub = batch.index(rows)
            n = int((sub.labels[:, 1:] != -100).sum())
            total += float(lm_loss(model, sub)) * n
            count += n
    return total / max(count, 1)


def measure_checkpoint(path: Path, dataset, grad_facts: int) -> dict:
    from mechrecall.consistency import measure
    from mechrecall.lab.evaluate import evaluate
    from mechrecall.lab.models import load_checkpoint

    model, tok, meta = load_checkpoint(path)
    facts = dataset.factset(dataset.pids("validation"))
    m = measure(model, tok, facts, grad_facts=grad_facts)
    g, r = m["gradient"], m["representation"]
    stage = meta.get("stage")
    formats = (
        ("storage",) if stage in ("stage1",) else ("query",) if stage in ("stage2", "qa") else ("storage", "query")
    )
    recall = evaluate(model, tok, dataset, splits=("train",), storage=False)
    return {
        "step": meta.get("global_step"),
        "stage": stage,
        "grad_margin": g["same_fact_mean_cos"] - g["baseline_mean_cos"],
        "rep_subject_margin": r["subject_last_layer_margin"],
        "rep_final_margin": r["final_last_layer_margin"],
        "train_loss": _train_loss(model, tok, dataset, formats),
        "trained_qa": recall["trained_qa"],
    }


def run_one(name: str, preset_name: str, out: Path, fractions, grad_facts: int) -> dict:
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.train import train

    regime, overrides = GRID[name]
    preset = get_preset(preset_name, overrides)
    run_dir = out / "runs" / name
    done = run_dir / "measured.json"
    if done.exists():
        return json.loads(done.read_text())
    dataset = generate(preset.data.spec(), preset.seed)
    budget = _budget(preset, regime)
    t0 = time.perf_counter()
    row: dict = {"name": name, "regime": regime, "overrides": overrides, "budget": budget, "at": {}}
    for f in fractions:
        step = max(1, round(f * budget))
        result = train(preset, regime, run_dir, progress=False, stop_after=step)
        at = result.get("interrupted_at", step)
        path = run_dir / regime / "checkpoints" / f"step-{at:06d}"
        row["at"][str(f)] = measure_checkpoint(path, dataset, grad_facts)
    meta = train(preset, regime, run_dir, progress=False)
    row["final"] = {k: meta["metrics"][k] for k in ("heldout_qa", "validation_qa", "trained_qa", "storage")}
    row["seconds"] = time.perf_counter() - t0
    from mechrecall.io import atomic_write_json

    atomic_write_json(done, row)
    return row


WITHIN_MIN_RUNS = 6  # a within-regime correlation needs this many runs of the regime


def _table(rows: list[dict], f):
    import pandas as pd

    return pd.DataFrame(
        [{"heldout_qa": r["final"]["heldout_qa"], **{k: r["at"][str(f)][k] for k in (*PREDICTORS, *BASELINES)}}
         for r in rows]
    )  # fmt: skip


def analyse(rows: list[dict], fractions, n_boot: int = 2000) -> dict:
    """Per fraction, each predictor's Spearman rho with final held-out QA over all runs (and against the baselines)."""
    from mechrecall.lab.predict import compare_predictors

    return {
        str(f): [r.to_dict() for r in compare_predictors(_table(rows, f), "heldout_qa", PREDICTORS, BASELINES,
                                                           n_boot=n_boot)]
        for f in fractions
    }  # fmt: skip


def analyse_within(rows: list[dict], fractions, n_boot: int = 2000) -> dict:
    """The same within each regime that has at least :data:`WITHIN_MIN_RUNS` runs: does early consistency tell
    runs of one regime apart, beyond telling the regimes apart?"""
    out: dict = {}
    for regime in dict.fromkeys(r["regime"] for r in rows):
        sub = [r for r in rows if r["regime"] == regime]
        if len(sub) >= WITHIN_MIN_RUNS:
            out[regime] = analyse(sub, fractions, n_boot)
    return out


def figure(rows: list[dict], fractions):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = [*PREDICTORS, *BASELINES]
    fig = make_subplots(rows=len(fractions), cols=len(cols), subplot_titles=[f"{c} @ {f:.0%}" for f in fractions
                                                                              for c in cols])  # fmt: skip
    for i, f in enumerate(fractions):
        for j, c in enumerate(cols):
            fig.add_trace(go.Scatter(x=[r["at"][str(f)][c] for r in rows], y=[r["final"]["heldout_qa"] for r in rows],
                                     mode="markers", text=[r["name"] for r in rows], showlegend=False),
                          row=i + 1, col=j + 1)  # fmt: skip
    fig.update_layout(
        title="Early measures (x) against final held-out QA (y), one point per run", height=320 * len(fractions)
    )
    return fig


def main(argv=None) -> int:
    ap = Parser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--runs", nargs="+", default=list(GRID), choices=list(GRID))
    ap.add_argument("--fractions", nargs="+", type=fraction, default=[0.1, 0.25])
    ap.add_argument("--grad-facts", type=at_least(2), default=48)
    ap.add_argument("--boot", type=positive_int, default=2000)
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        check_out(out)
        rows = [run_one(n, args.preset, out, args.fractions, args.grad_facts) for n in args.runs]
        result = {"preset": args.preset, "fractions": args.fractions, "runs": rows,
                  "correlations": analyse(rows, args.fractions, args.boot),
                  "within_regime": analyse_within(rows, args.fractions, args.boot),
                  "total_seconds": sum(r["seconds"] for r in rows)}  # fmt: skip
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2

    from mechrecall.io import atomic_write_files

    page = figure(rows, args.fractions).to_html(include_plotlyjs=True)
    atomic_write_files(out, {"predict.json": result, "predict.html": page})
    for f, res in result["correlations"].items():
        for r in res:
            print(f"{float(f):.0%} {r['predictor']:20s} rho={r['rho']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]")
    for regime, by in result["within_regime"].items():
        for f, res in by.items():
            for r in res:
                print(f"within {regime} {float(f):.0%} {r['predictor']:20s} rho={r['rho']:+.2f} "
                      f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
