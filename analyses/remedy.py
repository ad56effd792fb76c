"""A consistency-aware recipe (beyond the paper): can an explicit cross-format term make training generalize?

    python analyses/remedy.py --out runs/remedy [--preset micro] [--seeds 0 1 2]

Every variant in :data:`VARIANTS` is a training option (``--set ...``, see mechrecall.lab.objectives) tried against
plain two-stage and plain mixed training at equal step budgets (the preset's budgets and stopping rule: stage 2 may
stop early on trained QA in any variant; the alignment terms add forwards, not steps; :data:`CONTROLS` gives plain
mixed more steps than the live term's extra forwards cost):

- ``two-stage+...``: stage 2 (QA of the trained half only) with a term that pulls each trained QA example's hidden
  states at the answer-predicting token towards the frozen stage-1 model's states of the same fact in its biography
  (no biography is trained on in stage 2: the two-stage constraint holds). Losses: ``cos`` (1 - cosine), ``mse``,
  ``con`` (InfoNCE against the other facts of the batch: the same-minus-mismatched margin); every block output, or
  the last only (``last``); weight ``w``.
- ``mixed+...``: mixed training with the same term against the model's own biography states (``live``).

Two-stage variants of a seed share that seed's stage 1 (copied from the plain two-stage run, so they differ only in
stage 2). Selection is on the **validation** people only: at seed 0 each family's variant with the highest final
validation QA is chosen, then it, both baselines and the compute control run at the other ``--seeds``, which give
the headline numbers (seed 0 chose, so its held-out QA is reported beside them only); held-out QA is reported,
never used. Writes ``OUT/remedy.json`` (every run's metrics, the choices, means, the share of the two-stage-to-mixed
held-out gap each chosen variant closes and its held-out QA over plain mixed) and ``remedy.html``. The compute
control ``mixed@1.2x-steps`` runs at every seed too. Finished runs are reused, so an interrupted sweep
resumes.

``--converge`` (fresh seeds 3 4 5 unless ``--seeds`` says otherwise) trains the two baselines and the two variants
the sweep chose (:data:`CONVERGE`), each to convergence by a rule fixed before its runs: mixed runs up to 4x the
preset's steps (the schedule spans the longer budget), stopping once three evaluations in a row have not beaten the
best validation QA before them by more than 0.01 (``stop_at_plateau``); two-stage runs get 4x the stage-2 steps and
keep the preset's stop at 0.95 trained QA, so that the two are compared at matched trained QA when both reach it
(each run's trained QA, storage and ``stopped_early`` are reported: a run that used its whole budget did not reach
its stop rule). The plateau rule reads noisy validation QA (questions of 20 people) while the learning rate has not
yet decayed, so a stop marks a flat stretch of validation QA, not a proven ceiling. Writes ``OUT/converge.json``: every run's final metrics and steps, the gains at convergence (means over
the seeds, with each seed's), and the gains at equal steps read from the runs' histories (held-out QA logged along
each run, compared at the evaluation steps both runs reached).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

# name -> (regime, overrides on the preset); the first of each family is its baseline
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "two-stage": ("two_stage", []),
    "two-stage+cos-w1": ("two_stage", ["two_stage.stage2.align_weight=1"]),
    "two-stage+cos-w10": ("two_stage", ["two_stage.stage2.align_weight=10"]),
    "two-stage+cos-last-w10": (
        "two_stage",
        ["two_stage.stage2.align_weight=10", "two_stage.stage2.align_layers=[{last_layer}]"],
    ),
    "two-stage+mse-w1": ("two_stage", ["two_stage.stage2.align_weight=1", "two_stage.stage2.align_loss=mse"]),
    "two-stage+con-w1": ("two_stage", ["two_stage.stage2.align_weight=1", "two_stage.stage2.align_loss=contrastive"]),
    # second round (after reading the first round's validation QA: larger weights)
    "two-stage+cos-w30": ("two_stage", ["two_stage.stage2.align_weight=30"]),
    "two-stage+con-w3": ("two_stage", ["two_stage.stage2.align_weight=3", "two_stage.stage2.align_loss=contrastive"]),
    "two-stage+con-w10": ("two_stage", ["two_stage.stage2.align_weight=10", "two_stage.stage2.align_loss=contrastive"]),
    "mixed": ("mixed", []),
    "mixed+cos-w1": ("mixed", ["mixed.align_weight=1", "mixed.align_teacher=live"]),
    "mixed+con-w1": ("mixed", ["mixed.align_weight=1", "mixed.align_teacher=live", "mixed.align_loss=contrastive"]),
    "mixed+cos-w10": ("mixed", ["mixed.align_weight=10", "mixed.align_teacher=live"]),
    "mixed+con-w10": ("mixed", ["mixed.align_weight=10", "mixed.align_teacher=live", "mixed.align_loss=contrastive"]),
}
# compute controls, run at every seed next to the baselines: the live alignment term adds one forward (no backward)
# of the batch's biography prefixes per step, about a sixth of a mixed step's work; mixed with 20 % more steps
# (its schedule stretched to them) gives plain mixed at least that compute
CONTROLS: dict[str, tuple[str, list[str]]] = {"mixed@1.2x-steps": ("mixed", ["mixed.steps={mixed_steps_x1.2}"])}
VARIANTS.update(CONTROLS)
METRICS = ("heldout_qa", "validation_qa", "trained_qa", "storage")
# --converge: (variant, baseline) pairs of the sweep's choices, and the budgets that let each run converge
CONVERGE = {"mixed+con-w1": "mixed", "two-stage+con-w10": "two-stage"}
CONVERGE_SET = {"mixed": ["mixed.steps={mixed_steps_x4}", "mixed.stop_at_plateau=3", "mixed.plateau_delta=0.01"],
                "two_stage": ["two_stage.stage2.steps={stage2_steps_x4}"]}  # fmt: skip


def family(name: str) -> str:
    return name.split("+", 1)[0]


def resolve(overrides: list[str], preset) -> list[str]:
    """Fill a variant's placeholders from the preset: ``{last_layer}`` (the last block output's hidden-state index)
    and ``{mixed_steps_x1.2}`` (20 % more mixed steps), so that every variant means the same on any preset."""
    values = {"{last_layer}": str(preset.model.n_layers), "{mixed_steps_x1.2}": str(round(1.2 * preset.mixed.steps)),
              "{mixed_steps_x4}": str(4 * preset.mixed.steps),
              "{stage2_steps_x4}": str(4 * preset.two_stage.stage2.steps)}  # fmt: skip
    out = []
    for o in overrides:
        for k, v in values.items():
            o = o.replace(k, v)
        out.append(o)
    return out


def _shares_stage1(extra: list[str]) -> bool:
    """A two-stage variant may start from the plain run's stage 1 only when it changes stage 2 alone."""
    return bool(extra) and all(o.startswith("two_stage.stage2.") for o in extra)


def run_one(name: str, seed: int, preset_name: str, out: Path, overrides: list[str]) -> dict:
    """Train (or reuse) one variant at one seed; two-stage variants of stage 2 start from the plain run's stage 1."""
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import read_meta
    from mechrecall.lab.train import seed_run, train

    regime, extra = VARIANTS[name]
    base = get_preset(preset_name, [*overrides, f"seed={seed}"])
    extra = resolve(extra, base)
    preset = get_preset(preset_name, [*overrides, f"seed={seed}", *extra])
    run_dir = out / "runs" / f"{name}-s{seed}"
    shared = 0.0
    if regime == "two_stage" and _shares_stage1(extra):
        plain = out / "runs" / f"two-stage-s{seed}"
        run_one("two-stage", seed, preset_name, out, overrides)
        stage1 = read_meta(plain / "two_stage" / "stage1")
        shared = stage1.get("train_seconds", 0.0)
        boundary = plain / "two_stage" / "checkpoints" / f"step-{stage1['global_step']:06d}"
        target = run_dir / "two_stage" / "checkpoints" / boundary.name
        if not (run_dir / regime / "final").exists() and not (target / "trainer_state.pt").exists():
            # copied under a temporary name, then renamed: an interrupted copy is never taken for a checkpoint
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(plain / "data", run_dir / "data")
            tmp = target.with_name(target.name + ".tmp")
            shutil.copytree(boundary, tmp)
            tmp.rename(target)
            seed_run(run_dir / regime, preset, regime)  # the copied stage-1 checkpoint starts this variant's run
    t0 = time.perf_counter()
    meta = train(preset, regime, run_dir, progress=False)
    row = {"name": name, "seed": seed, "regime": regime, "overrides": extra, **{k: meta["metrics"][k] for k in METRICS}}
    row["global_step"] = meta.get("global_step")
    row["stopped_early"] = meta["metrics"].get("stopped_early")  # a stop rule fired before the step budget
    row["seconds"] = meta.get("train_seconds", time.perf_counter() - t0)
    row["shared_stage1_seconds"] = shared  # counted once, in the plain run
    return row


def choose(rows: list[dict]) -> dict[str, str]:
    """Per family, the non-baseline variant with the highest validation QA at seed 0 (ties: the first listed)."""
    out = {}
    for fam in dict.fromkeys(family(n) for n in VARIANTS):
        cands = [r for r in rows if r["seed"] == 0 and family(r["name"]) == fam and "+" in r["name"]]
        if cands:
            out[fam] = max(cands, key=lambda r: r["validation_qa"])["name"]
    return out


def summarize(rows: list[dict], names: list[str], seeds=None) -> dict:
    """Mean and sd (ddof 1; 0 for one seed) of each metric per variant, over ``seeds`` (default: all its runs)."""
    stats = {}
    for n in names:
        rs = [r for r in rows if r["name"] == n and (seeds is None or r["seed"] in seeds)]
        if not rs:
            continue
        stats[n] = {"seeds": [r["seed"] for r in rs],
                    **{k: {"mean": float(np.mean([r[k] for r in rs])),
                           "sd": float(np.std([r[k] for r in rs], ddof=1)) if len(rs) > 1 else 0.0}
                       for k in METRICS}}  # fmt: skip
    return stats


def gap_closed(stats: dict, variant: str) -> float | None:
    """Share of the plain two-stage -> plain mixed held-out gap that ``variant`` closes (means over the seeds of
    ``stats``)."""
    lo, hi = stats["two-stage"]["heldout_qa"]["mean"], stats["mixed"]["heldout_qa"]["mean"]
    v = stats[variant]["heldout_qa"]["mean"]
    return None if hi <= lo else (v - lo) / (hi - lo)


def figure(result: dict):
    import plotly.graph_objects as go

    rows = result["runs"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig = go.Figure()
    for metric in ("validation_qa", "heldout_qa"):
        fig.add_trace(go.Bar(name=f"{metric} (seed 0)", x=names,
                             y=[next((r[metric] for r in rows if r["name"] == n and r["seed"] == 0), None)
                                for n in names]))  # fmt: skip
    fig.update_layout(barmode="group", title="Consistency-aware objectives vs plain two-stage and mixed",
                      yaxis_title="exact match")  # fmt: skip
    return fig


def _history(out: Path, name: str, seed: int, regime: str) -> dict[int, float]:
    """Held-out QA along a run (global step -> value), from its history.json."""
    import json

    path = out / "runs" / f"{name}-s{seed}" / regime / "history.json"
    return {e["global_step"]: e["heldout_qa"] for e in json.loads(path.read_text()) if "heldout_qa" in e}


def converge(preset_name: str, seeds: list[int], out: Path, overrides: list[str]) -> dict:
    """The chosen variants and their baselines trained to convergence (:data:`CONVERGE_SET`), per seed."""
    from mechrecall.lab.config import get_preset

    rows, equal_steps = [], {}
    for seed in seeds:
        base = get_preset(preset_name, [*overrides, f"seed={seed}"])
        for variant, baseline in CONVERGE.items():
            regime = VARIANTS[baseline][0]
            extra = [*overrides, *resolve(CONVERGE_SET[regime], base)]
            pair = [run_one(n, seed, preset_name, out, extra) for n in (baseline, variant)]
            rows.extend(pair)
            a, b = _history(out, baseline, seed, regime), _history(out, variant, seed, regime)
            equal_steps[f"{variant} s{seed}"] = {str(k): b[k] - a[k] for k in sorted(set(a) & set(b))}
    gains = {}
    for variant, baseline in CONVERGE.items():
        diffs = [next(r for r in rows if r["name"] == variant and r["seed"] == s)["heldout_qa"]
                 - next(r for r in rows if r["name"] == baseline and r["seed"] == s)["heldout_qa"] for s in seeds]  # fmt: skip
        gains[variant] = {"over": baseline, "per_seed": diffs, "mean": float(np.mean(diffs))}
    return {"preset": preset_name, "seeds": seeds, "overrides": overrides, "rules": CONVERGE_SET, "runs": rows,
            "gain_at_convergence": gains, "gain_at_equal_steps": equal_steps}  # fmt: skip


def main(argv=None) -> int:
    from mechrecall.cli import Parser, check_out

    ap = Parser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--converge: 3 4 5)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--converge", action="store_true", help="the chosen variants and baselines to convergence")
    args = ap.parse_args(argv)
    out = Path(args.out)
    from mechrecall.io import atomic_write_files, atomic_write_json

    if args.converge:
        try:
            check_out(out)
            result = converge(args.preset, args.seeds or [3, 4, 5], out / "converge", args.overrides)
        except (KeyError, ValueError) as e:
            print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
        atomic_write_json(out / "converge.json", result)
        for r in result["runs"]:
            print(f"{r['name']:24s} s{r['seed']} held-out {r['heldout_qa']:.3f} validation {r['validation_qa']:.3f} "
                  f"trained {r['trained_qa']:.3f} storage {r['storage']:.3f} step {r['global_step']}")  # fmt: skip
        for v, g in result["gain_at_convergence"].items():
            print(
                f"{v} over {g['over']} at convergence: {g['mean']:+.3f} (per seed {', '.join(f'{d:+.3f}' for d in g['per_seed'])})"
            )
        return 0
    args.seeds = args.seeds or [0, 1, 2]

    try:
        check_out(out)
        rows = [run_one(n, 0, args.preset, out, args.overrides) for n in args.variants]
        chosen = choose(rows)
        for seed in [s for s in args.seeds if s != 0]:
            for n in ["two-stage", "mixed", *CONTROLS, *chosen.values()]:
                if n in args.variants:
                    rows.append(run_one(n, seed, args.preset, out, args.overrides))
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    keep = [n for n in ["two-stage", "mixed", *CONTROLS, *chosen.values()] if n in args.variants]
    # the headline is over the confirmation seeds (not 0): seed 0's validation people chose the variant, and its
    # held-out QA comes from the same run, so it is reported beside them, not in the headline
    confirm = [s for s in args.seeds if s != 0] or [0]
    stats = summarize(rows, keep, confirm)

    def versus(ref: str) -> dict:
        return {n: stats[n]["heldout_qa"]["mean"] - stats[ref]["heldout_qa"]["mean"] for n in stats if n != ref} \
            if ref in stats else {}  # fmt: skip

    result = {
        "preset": args.preset, "overrides": args.overrides, "seeds": args.seeds, "variants": dict(VARIANTS),
        "runs": rows, "chosen": chosen, "chosen_by": "final validation QA at seed 0", "confirmation_seeds": confirm,
        "stats": stats, "stats_all_seeds": summarize(rows, keep),
        "gap_closed": {n: gap_closed(stats, n) for n in chosen.values()}
        if {"two-stage", "mixed"} <= set(stats) else {},
        "over_mixed": versus("mixed"), "over_compute_control": versus(next(iter(CONTROLS))),
        "total_seconds": sum(r["seconds"] - r.get("shared_stage1_seconds", 0.0) for r in rows),
    }  # fmt: skip
    atomic_write_files(out, {"remedy.json": result, "remedy.html": figure(result).to_html(include_plotlyjs=True)})
    for r in rows:  # every variant's validation QA (what chose); held-out QA only for what is reported
        shown = f"held-out {r['heldout_qa']:.3f} " if r["name"] in keep else ""
        print(f"{r['name']:24s} s{r['seed']} {shown}validation {r['validation_qa']:.3f} "
              f"trained {r['trained_qa']:.3f} storage {r['storage']:.3f} step {r['global_step']}")  # fmt: skip
    print(f"chosen (validation): {chosen}; gap closed: {result['gap_closed']}; over mixed: {result['over_mixed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
