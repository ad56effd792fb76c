"""Pre-instruction against mixed training at matched compute (beyond the paper: the third regime)

    python analyses/matched_compute.py --out runs/micro/matched [--preset micro] [--seeds 1 2 3]

Per seed, three runs from scratch: pre-instruction as the preset has it (QA of the trained half until the stage's
stop rule, at most ``pre_instruction.qa.steps``, then biographies and QA jointly for ``pre_instruction.joint.steps``);
then mixed training for the same number of optimizer steps as that pre-instruction run took (**matched steps**) and
for the same number of training rows (**matched rows**: a QA-stage step holds ``qa.batch_query`` rows, a joint or
mixed step ``batch_storage + batch_query``). Budgets are fixed before any run, so nothing is chosen and every run's
held-out QA is read at its end. Writes ``matched.json``: every run's held-out / validation / trained QA, storage,
steps and rows, and per comparison the paired difference pre-instruction - mixed at each seed with its mean and
range. A finished run is reused, so an interrupted study resumes; ``--set key=value`` applies to every run (the tests
shrink the budgets with it).

``--mechanism`` also trains a two-stage run per seed (the preset's) and runs every pair analysis of ``reproduce``
(consistency, masks, patching, attribution) on two pairs per seed, (two-stage, pre-instruction) and (mixed at
matched steps, mixed at matched rows); the numbers kept are each model's own (:data:`MEASURES`), which do not depend
on the model it is paired with. Writes ``mechanism.json``: per seed and measure every model's value, whether the
order two-stage < mixed (matched steps) < pre-instruction holds, and pre-instruction minus each mixed run. The rule,
fixed before the runs: a measure keeps "the regimes' order" only if the order holds at every seed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mechrecall.cli import Parser, check_out

METRICS = ("heldout_qa", "validation_qa", "trained_qa", "storage")
# --mechanism: the pairs analysed per seed (first, second: labels are the run names) and each model's own numbers
PAIRS = (("two-stage", "pre-instruction"), ("mixed-matched-steps", "mixed-matched-rows"))
ORDER = ("two-stage", "mixed-matched-steps", "pre-instruction")


def _best_hit(patching: dict, label: str) -> float:
    from mechrecall.patching.record import best_site

    return float(best_site(patching["models"][label]["sites"]["resid_pre"], "hit")["value"])


# measure -> (analysis JSON, the value for one model's label)
MEASURES = {
    "gradient_margin": ("consistency.json", lambda j, r: j["gradient"][r]["same_fact_mean_cos"]
                        - j["gradient"][r]["baseline_mean_cos"]),
    "representation_margin_final": ("consistency.json", lambda j, r: j["representation"][r]["final_last_layer_margin"]),
    "shared_fraction": ("masks.json", lambda j, r: j[r]["shared_fraction"]),
    "patching_best_hit": ("patching.json", _best_hit),
    "ig_subject_relation_preceding": ("attribution.json", lambda j, r: j[r]["subject_relation_preceding_share"]),
}  # fmt: skip


def _rows(preset, regime: str, regime_dir: Path) -> int:
    """Training rows a finished run consumed: each stage's steps (from its checkpoint's meta, so a run finished by an
    earlier call counts the same) times its rows a step."""
    from mechrecall.checkpoint import read_meta
    from mechrecall.lab.train import stage_plan

    plan = stage_plan(preset, regime)
    total = 0
    for i, (stage, cfg) in enumerate(plan):
        steps = read_meta(regime_dir / ("final" if i == len(plan) - 1 else stage))["metrics"]["steps"]
        total += steps * (cfg.batch_storage + cfg.batch_query)
    return total


def _run(preset, regime: str, run_dir: Path) -> dict:
    """Train (or reuse) one run; its final metrics, steps and rows."""
    from mechrecall.io import atomic_write_json
    from mechrecall.lab.train import train

    done = run_dir / "result.json"
    if done.exists():
        import json

        return json.loads(done.read_text())
    t0 = time.perf_counter()
    meta = train(preset, regime, run_dir, progress=False)
    row = {"regime": regime, "seed": preset.seed, "steps": meta["global_step"],
           "rows": _rows(preset, regime, run_dir / regime), **{k: meta["metrics"][k] for k in METRICS},
           "seconds": time.perf_counter() - t0}  # fmt: skip
    atomic_write_json(done, row)
    return row


def run_seed(preset_name: str, seed: int, out: Path, extra: list[str]) -> dict[str, dict]:
    from mechrecall.lab.config import get_preset

    base = [*extra, f"seed={seed}"]
    pre_preset = get_preset(preset_name, base)
    pre = _run(pre_preset, "pre_instruction", out / f"seed-{seed}" / "pre-instruction")
    per_mixed_step = pre_preset.mixed.batch_storage + pre_preset.mixed.batch_query
    budgets = {"mixed-matched-steps": pre["steps"], "mixed-matched-rows": round(pre["rows"] / per_mixed_step)}
    runs = {"pre-instruction": pre}
    for name, steps in budgets.items():
        preset = get_preset(preset_name, [*base, f"mixed.steps={steps}"])
        runs[name] = _run(preset, "mixed", out / f"seed-{seed}" / name)
    return runs


def mechanism_seed(preset_name: str, seed: int, out: Path, extra: list[str], runs: dict[str, dict]) -> dict:
    """Train (or reuse) the seed's two-stage run, analyse both pairs (a finished pair's JSONs are reused) and return
    every model's :data:`MEASURES`."""
    import json

    from mechrecall.io import atomic_write_json
    from mechrecall.lab.config import get_preset
    from mechrecall.report.reproduce import run_analyses

    seed_dir = out / f"seed-{seed}"
    runs["two-stage"] = _run(get_preset(preset_name, [*extra, f"seed={seed}"]), "two_stage", seed_dir / "two-stage")
    regime = {"two-stage": "two_stage", "pre-instruction": "pre_instruction"}
    values: dict[str, dict[str, float]] = {}
    for first, second in PAIRS:
        pair_dir = seed_dir / "analyses" / f"{first}--{second}"
        if not (pair_dir / "done.json").exists():
            folders = [str(seed_dir / n / regime.get(n, "mixed") / "final") for n in (first, second)]
            seconds = run_analyses(*folders, pair_dir, labels=(first, second))
            atomic_write_json(pair_dir / "done.json", {"seconds": seconds})
        read = {file: json.loads((pair_dir / file).read_text()) for file, _ in MEASURES.values()}  # each file once
        for name, (file, get) in MEASURES.items():
            j = read[file]
            for label in (first, second):
                values.setdefault(label, {})[name] = float(get(j, label))
    return values


def mechanism_summary(by_seed: dict[int, dict[str, dict[str, float]]]) -> dict:
    """Per measure: each seed's order check and pre-instruction minus each mixed run; the rule's verdict."""
    out = {}
    for m in MEASURES:
        holds = [all(v[a][m] < v[b][m] for a, b in zip(ORDER, ORDER[1:])) for v in by_seed.values()]
        minus = {
            name: [v["pre-instruction"][m] - v[name][m] for v in by_seed.values()]
            for name in ("mixed-matched-steps", "mixed-matched-rows")
        }
        out[m] = {
            "order_holds_per_seed": holds,
            "order_holds_at_every_seed": all(holds),
            "pre_instruction_minus": minus,
        }
    return out


def paired(by_seed: dict[int, dict[str, dict]], against: str) -> dict:
    """Pre-instruction minus ``against`` at each seed, per metric: the differences, their mean, min and max."""
    out = {}
    for k in METRICS:
        diffs = [runs["pre-instruction"][k] - runs[against][k] for runs in by_seed.values()]
        out[k] = {"per_seed": diffs, "mean": sum(diffs) / len(diffs), "min": min(diffs), "max": max(diffs)}
    return out


def main(argv=None) -> int:
    ap = Parser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--mechanism", action="store_true",
                    help="also a two-stage run per seed and every pair analysis on the seed's models")  # fmt: skip
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a preset override applied to every run (e.g. mixed.batch_query=16)")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        check_out(out)
        by_seed = {s: run_seed(args.preset, s, out, args.overrides) for s in args.seeds}
        mech = (
            {s: mechanism_seed(args.preset, s, out, args.overrides, by_seed[s]) for s in args.seeds}
            if args.mechanism
            else None
        )
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    from mechrecall.io import atomic_write_json

    result = {"preset": args.preset, "seeds": args.seeds, "overrides": args.overrides,
              "runs": {str(s): runs for s, runs in by_seed.items()},
              "pre_instruction_minus": {name: paired(by_seed, name)
                                        for name in ("mixed-matched-steps", "mixed-matched-rows")}}  # fmt: skip
    atomic_write_json(out / "matched.json", result)
    if mech is not None:
        summary = mechanism_summary(mech)
        atomic_write_json(out / "mechanism.json", {"preset": args.preset, "seeds": args.seeds, "order": ORDER,
                                                   "values": {str(s): v for s, v in mech.items()}, "summary": summary})  # fmt: skip
        for m, d in summary.items():
            per = " ".join(f"s{s}:" + "/".join(f"{mech[s][n][m]:.3f}" for n in ORDER) for s in args.seeds)
            print(
                f"{m:32s} two-stage/mixed-steps/pre-instruction {per} order at every seed: {d['order_holds_at_every_seed']}"
            )
    for s, runs in by_seed.items():
        for name, r in runs.items():
            print(f"seed {s} {name:20s} steps {r['steps']:5d} rows {r['rows']:7d} held-out QA {r['heldout_qa']:.3f} "
                  f"validation {r['validation_qa']:.3f} trained {r['trained_qa']:.3f} storage {r['storage']:.3f}")  # fmt: skip
    for name, d in result["pre_instruction_minus"].items():
        h = d["heldout_qa"]
        print(
            f"pre-instruction - {name}: held-out QA {h['mean']:+.3f} (per seed {', '.join(f'{x:+.3f}' for x in h['per_seed'])})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
