"""Choose a budget (or a learning rate) from training histories, reading the validation people only.

    python analyses/choose_budget.py runs/sweep/mixed/history.json
    python analyses/choose_budget.py runs/gemma3/lr1e-4/mixed/history.json runs/gemma3/lr3e-4/mixed/history.json \\
        --at-step 150 --min-trained 0

Prints, per history, every evaluation's trained QA, validation QA, validation answer NLL and storage recall (never a
held-out column), then the choice of ``mechrecall.lab.select.choose``: among steps with trained QA >= --min-trained,
the highest validation QA, ties to the lower validation NLL, then the earlier step; the last step when none
qualifies. ``--json FILE`` also writes the choice. A missing or malformed history is one ``error:`` line, exit 2.
"""

import sys
from dataclasses import asdict

import pandas as pd

from mechrecall.cli import Parser, nonnegative_int, run_cli
from mechrecall.io import atomic_write_json
from mechrecall.lab.select import choose, read_history, validation_view


def _main(args) -> int:
    histories = [read_history(p) for p in args.histories]
    choice = choose(histories, min_trained=args.min_trained, at_step=args.at_step, stage=args.stage)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        for path, h in zip(args.histories, histories):
            print(f"== {path}")
            print(validation_view(h, args.stage).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    rule = "qualified" if choice.qualified else f"no step reached trained QA >= {args.min_trained}: the last step"
    nll = "n/a" if choice.validation_qa_nll is None else f"{choice.validation_qa_nll:.3f}"
    where = f"{choice.stage} " if choice.stage else ""
    print(f"chosen: {args.histories[choice.run]} {where}step {choice.step} (global {choice.global_step}; trained QA "
          f"{choice.trained_qa:.3f}, validation QA {choice.validation_qa:.3f}, validation NLL {nll}; {rule})")  # fmt: skip
    if args.json:
        try:
            atomic_write_json(args.json, {"history": args.histories[choice.run], **asdict(choice)})
        except OSError as e:  # a bad output path is bad input: one line, exit 2
            raise ValueError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
    return 0


def main(argv=None) -> int:
    ap = Parser(description=__doc__)
    ap.add_argument("histories", nargs="+", help="history.json files (a run's <regime>/history.json)")
    ap.add_argument("--min-trained", type=float, default=0.95, help="trained QA a step needs (default 0.95)")
    ap.add_argument("--at-step", type=nonnegative_int, default=None, help="compare the histories at this step only")
    ap.add_argument("--stage", default=None, help="one stage of the histories (mixed, stage2, ...)")
    ap.add_argument("--json", default=None, help="also write the choice to this file")
    return run_cli(_main, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
