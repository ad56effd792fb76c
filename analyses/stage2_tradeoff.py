"""Two-stage, stage 2: the trade-off between trained QA and retained storage recall, per recipe.

Starts every recipe in mechrecall.lab.stage2.RECIPES from the same stage-1 checkpoint of a finished run and writes
OUT/stage2_sweep.json and OUT/stage2_tradeoff.html. The chosen recipe (highest storage recall at the first
evaluation where trained QA >= target) is selected without looking at validation or held-out people.

    python analyses/stage2_tradeoff.py --run runs/default/seed0 --out runs/default/stage2_sweep
"""

import sys
from pathlib import Path

from mechrecall.cli import Parser, fraction, positive_int, run_cli
from mechrecall.lab.config import get_preset
from mechrecall.lab.stage2 import RECIPES, figure, sweep


def main(argv=None) -> int:
    ap = Parser(description=__doc__)
    ap.add_argument("--run", required=True, help="run folder of one seed (holds data/ and two_stage/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--steps", type=positive_int, default=None, help="stage-2 budget (default: the preset's)")
    ap.add_argument("--eval-every", type=positive_int, default=25)
    ap.add_argument("--target", type=fraction, default=0.95)
    return run_cli(_main, ap.parse_args(argv))


def _main(args) -> int:
    stage1 = Path(args.run) / "two_stage" / "stage1"
    if not stage1.is_dir():
        raise ValueError(
            f"--run {args.run}: no two-stage stage-1 checkpoint at {stage1} (a finished run's seed folder)"
        )
    preset = get_preset(args.preset, args.overrides)
    args.steps = args.steps or preset.two_stage.stage2.steps
    result = sweep(
        preset, args.run, args.out, args.recipes, steps=args.steps, eval_every=args.eval_every, target=args.target
    )
    figure(result).write_html(f"{args.out}/stage2_tradeoff.html", include_plotlyjs=True)
    for name, point in result["reached"].items():
        print(
            f"{name:20s} trained_qa>={args.target} at step {point['step']:4d}: storage={point['storage']:.3f} "
            f"validation_qa={point.get('validation_qa', float('nan')):.3f}"
        )
    missing = set(args.recipes) - set(result["reached"])
    for name in sorted(missing):
        print(f"{name:20s} never reached trained_qa>={args.target} in {args.steps} steps")
    print(f"chosen: {result['chosen']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
