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
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mechrecall.cli import Parser, check_out

METRICS = ("heldout_qa", "validation_qa", "trained_qa", "storage")


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
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a preset override applied to every run (e.g. mixed.batch_query=16)")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        check_out(out)
        by_seed = {s: run_seed(args.preset, s, out, args.overrides) for s in args.seeds}
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    from mechrecall.io import atomic_write_json

    result = {"preset": args.preset, "seeds": args.seeds, "overrides": args.overrides,
              "runs": {str(s): runs for s, runs in by_seed.items()},
              "pre_instruction_minus": {name: paired(by_seed, name)
                                        for name in ("mixed-matched-steps", "mixed-matched-rows")}}  # fmt: skip
    atomic_write_json(out / "matched.json", result)
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
