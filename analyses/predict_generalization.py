"""Does early cross-format consistency predict which runs will generalize? (beyond the paper: early prediction)

    python analyses/predict_generalization.py --out runs/micro/predict [--preset micro] [--fractions 0.1 0.25]

Trains a grid of 16 independent lab runs (:data:`GRID`): 8 mixed and 8 two-stage, each with its own data and
initialisation seed, so no two runs share a checkpoint. Mixed varies the query share of a batch and the weight decay;
two-stage varies stage 1's learning rate and weight decay (which act on the early measures) and stage 2's learning
rate (which acts only after the measured fractions, on the micro preset: stage 1 is its first 60 % of the budget). Each run is interrupted at fixed fractions of its step budget (the trainer's resumable
checkpoints), measured there, and resumed to the end. At each fraction, on the *validation* people: gradient
consistency (mean cosine of same-fact storage/query answer-loss gradients minus the mismatched-fact baseline) and
representation consistency (last-layer same-fact minus mismatched cosine at the subject and final tokens); and, at the
same checkpoint, the baselines: validation QA and its answer NLL (the obvious early read of generalization), the
training loss over one set of rows for every run (all biographies and the trained people's QA, whatever the regime
has trained on so far) and trained QA. The target is the run's final held-out QA (measurement only: nothing is chosen
by it). Statistics (:mod:`mechrecall.lab.predict`): Spearman rho with a permutation p-value, Holm-corrected over every
correlation of the pooled analysis (and separately over the within-regime ones), a bootstrap interval, and for each
consistency measure the interval of ``|rho| - |rho|`` of each baseline at a Bonferroni level over the verdict's
claims (1 - 0.05 / (3 measures x the fractions)); a constant baseline counts as |rho| = 0. Writes ``predict.json`` (every run's numbers,
the correlations and the verdict: which measure, at which fraction, predicts better than validation QA and its NLL)
and ``predict.html``. A finished run is reused, so an interrupted grid resumes; ``--set key=value`` applies to every
run (the tests shrink the budgets with it).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from mechrecall.cli import Parser, at_least, check_out, fraction, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _grid() -> dict[str, tuple[str, list[str]]]:
    """name -> (regime, overrides on the preset); fixed before the grid was run, seeds 1-16 one per run."""
    grid: dict[str, tuple[str, list[str]]] = {}
    seed = 0
    for wd in (0.1, 0.5):
        for q in (8, 16, 32, 64):
            seed += 1
            grid[f"mixed-q{q}-wd{wd}-s{seed}"] = ("mixed", [f"mixed.batch_query={q}", f"mixed.weight_decay={wd}",
                                                           f"seed={seed}"])  # fmt: skip
    for lr1 in (1e-3, 3e-3):
        for wd in (0.1, 0.5):
            for lr2 in (3e-4, 3e-3):
                seed += 1
                grid[f"two-stage-lr{lr1:g}-wd{wd}-lr{lr2:g}-s{seed}"] = (
                    "two_stage",
                    [f"two_stage.stage1.lr={lr1}", f"two_stage.stage1.weight_decay={wd}",
                     f"two_stage.stage2.lr={lr2}", f"seed={seed}"],
                )  # fmt: skip
    return grid


GRID = _grid()
PREDICTORS = ("grad_margin", "rep_subject_margin", "rep_final_margin")
BASELINES = ("validation_qa", "validation_qa_nll", "train_loss", "trained_qa")
VALIDATION_BASELINES = ("validation_qa", "validation_qa_nll")
ALPHA = 0.05


def _budget(preset, regime: str) -> int:
    from mechrecall.lab.train import stage_plan

    return sum(cfg.steps for _, cfg in stage_plan(preset, regime))


@torch.no_grad()
def _train_loss(model, tokenizer, dataset) -> float:
    """Mean LM loss over all biographies and the trained people's QA, in batches of 64: the same rows for every run,
    so the baseline compares runs on one set of data whatever their regime has trained on so far."""
    from mechrecall.lab.train import TrainingData, lm_loss
    from mechrecall.recall import row_chunks

    data = TrainingData.build(dataset, tokenizer)
    total, count = 0.0, 0
    for fmt in ("storage", "query"):
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
    recall = evaluate(model, tok, dataset, splits=("train", "validation"), storage=False)
    return {
        "step": meta.get("global_step"),
        "stage": meta.get("stage"),
        "grad_margin": g["same_fact_mean_cos"] - g["baseline_mean_cos"],
        "rep_subject_margin": r["subject_last_layer_margin"],
        "rep_final_margin": r["final_last_layer_margin"],
        "validation_qa": recall["validation_qa"],
        "validation_qa_nll": recall["validation_qa_nll"],
        "train_loss": _train_loss(model, tok, dataset),
        "trained_qa": recall["trained_qa"],
    }


def run_one(name: str, preset_name: str, out: Path, fractions, grad_facts: int, extra: list[str] = ()) -> dict:
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.train import train

    regime, overrides = GRID[name]
    preset = get_preset(preset_name, [*overrides, *extra])
    run_dir = out / "runs" / name
    done = run_dir / "measured.json"
    if done.exists():
        return json.loads(done.read_text())
    dataset = generate(preset.data.spec(), preset.seed)
    budget = _budget(preset, regime)
    t0 = time.perf_counter()
    row: dict = {"name": name, "regime": regime, "overrides": [*overrides, *extra], "budget": budget, "at": {}}
    for f in fractions:
        step = max(1, round(f * budget))
        path = run_dir / regime / "checkpoints" / f"step-{step:06d}"
        if not path.exists():  # (a resumed run may have saved it before it stopped)
            at = train(preset, regime, run_dir, progress=False, stop_after=step).get("interrupted_at")
            if at != step:
                raise ValueError(f"run {name}: its checkpoint at step {step} ({f:.0%}) is missing and the run stopped "
                                 f"at {at}: start {run_dir} afresh")  # fmt: skip
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


def diff_level(fractions) -> float:
    """The level of the |rho| margins the verdict reads: Bonferroni over its claims (measures x fractions)."""
    return 1 - ALPHA / (len(PREDICTORS) * len(fractions))


def _correlations(rows: list[dict], fractions, n_boot: int) -> dict:
    from mechrecall.lab.predict import compare_predictors

    return {
        str(f): [r.to_dict() for r in compare_predictors(_table(rows, f), "heldout_qa", PREDICTORS, BASELINES,
                                                           n_boot=n_boot, diff_level=diff_level(fractions))]
        for f in fractions
    }  # fmt: skip


def analyse(rows: list[dict], fractions, n_boot: int = 2000) -> dict:
    """Per fraction, each measure's Spearman rho with final held-out QA over all runs, its permutation p-value
    (``p_holm``: Holm-corrected over every correlation here) and each predictor's margin over each baseline."""
    from mechrecall.lab.predict import holm_adjust

    out = _correlations(rows, fractions, n_boot)
    holm_adjust(out)
    return out


def analyse_within(rows: list[dict], fractions, n_boot: int = 2000) -> dict:
    """The same within each regime that has at least :data:`WITHIN_MIN_RUNS` runs: does early consistency tell
    runs of one regime apart, beyond telling the regimes apart? Holm's correction spans every regime and fraction."""
    from mechrecall.lab.predict import holm_adjust

    out: dict = {}
    for regime in dict.fromkeys(r["regime"] for r in rows):
        sub = [r for r in rows if r["regime"] == regime]
        if len(sub) >= WITHIN_MIN_RUNS:
            out[regime] = _correlations(sub, fractions, n_boot)
    holm_adjust({f"{regime} {f}": table for regime, by in out.items() for f, table in by.items()})
    return out


def verdict(correlations: dict) -> dict[str, list[str]]:
    """Per fraction, the consistency measures that predict better than validation QA: a Holm-corrected p below
    :data:`ALPHA` and, against validation QA and against its answer NLL, a bootstrap interval of ``|rho| - |rho_b|``
    (at :func:`diff_level`) entirely above 0. An empty list is the answer "none did"."""
    out = {}
    for f, table in correlations.items():
        out[f] = [r["predictor"] for r in table if r["predictor"] in PREDICTORS and r.get("p_holm", 1.0) < ALPHA
                  and all(r["abs_rho_minus_baseline"][b]["ci"][0] > 0 for b in VALIDATION_BASELINES)]  # fmt: skip
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
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a preset override applied to every run after the grid's own (e.g. mixed.steps=40)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        check_out(out)
        rows = [run_one(n, args.preset, out, args.fractions, args.grad_facts, args.overrides) for n in args.runs]
        correlations = analyse(rows, args.fractions, args.boot)
        result = {"preset": args.preset, "fractions": args.fractions, "overrides": args.overrides, "runs": rows,
                  "margin_interval_level": diff_level(args.fractions),
                  "correlations": correlations, "better_than_validation_qa": verdict(correlations),
                  "within_regime": analyse_within(rows, args.fractions, args.boot),
                  "total_seconds": sum(r["seconds"] for r in rows)}  # fmt: skip
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2

    from mechrecall.io import atomic_write_files

    page = figure(rows, args.fractions).to_html(include_plotlyjs=True)
    atomic_write_files(out, {"predict.json": result, "predict.html": page})
    tables = [("", result["correlations"])] + [(f"within {g} ", by) for g, by in result["within_regime"].items()]
    for prefix, by in tables:
        for f, res in by.items():
            for r in res:
                print(f"{prefix}{float(f):.0%} {r['predictor']:20s} rho={r['rho']:+.2f} [{r['ci'][0]:+.2f}, "
                      f"{r['ci'][1]:+.2f}] p={r['p']:.4f} Holm p={r['p_holm']:.4f}")  # fmt: skip
    for f, names in result["better_than_validation_qa"].items():
        print(f"better than validation QA and its NLL at {float(f):.0%}: {', '.join(names) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
