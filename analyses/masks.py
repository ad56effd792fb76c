"""Shared-update parameter masks of a checkpoint pair (the paper's finding 3).

    python analyses/masks.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default
    python analyses/masks.py --checkpoints smollm2-135m-instruct smollm2-135m-instruct \\
        --facts tests/data/facts.jsonl --ks 0.05 --draws 2 --out runs/smollm2

Lab checkpoints: ranks parameters by the training trace saved with each checkpoint (per-format mean |gradient|, or
--kind grad_x_update). Any other checkpoints with --facts FILE: by post-hoc importance (mean |per-example gradient|
of each format's texts; times |theta - theta_base| when --base is given; --importance to choose), recorded in
masks.json. Takes the top --k per format, intersects them, and measures: the shared set's size against the
random-overlap expectation, where it lies (layers, heads, neurons), gradient consistency inside vs outside it,
held-out QA after resetting it to the base weights (without --base for your checkpoints: to each matrix's mean;
against size-matched random masks and format-only masks), and the recipient's held-out QA after grafting it into the
other model. Writes OUT/masks.json and masks.html.
"""

import sys

from _common import add_user_args, pair, user_kwargs

from mechrecall.cli import Parser, at_least, fraction, positive_int, run_cli
from mechrecall.report.masks import IMPORTANCES, run, summary_rows


def _main(args) -> int:
    given = user_kwargs(args)
    split = given.pop("split")
    # the options of post-hoc masks on a fact file; a lab pair's masks come from its training traces
    on_facts = dict(split=split, count=args.count, importance=args.importance, batch_size=args.batch_size,
                    recall_format=args.recall_format, **({"layers": args.layers} if args.layers else {}))  # fmt: skip
    result = run(
        *pair(args), args.out, base=args.base, registry=args.registry, k=args.k, kind=args.kind, scope=args.scope,
        draws=args.draws, **({"ks": args.ks} if args.ks else {}), sweep_draws=min(2, args.draws),
        consistency_facts=args.consistency_facts, **given, **(on_facts if args.facts else {}),
    )  # fmt: skip
    print("\n".join(summary_rows(result)))
    return 0


def main(argv=None) -> int:

    ap = Parser(description=__doc__)
    ap.add_argument("--two-stage", default="default-s0-two-stage", help="registry name or folder")
    ap.add_argument("--mixed", default="default-s0-mixed", help="registry name or folder")
    ap.add_argument("--base", default=None, help="base checkpoint (default: the registry entry's base_model)")
    add_user_args(ap)
    ap.add_argument("--k", type=fraction, default=0.05, help="top fraction per format (default 0.05)")
    ap.add_argument(
        "--ks", type=fraction, nargs="+", default=None, help="mask sizes of the sweep (default 0.01 ... 0.2)"
    )
    ap.add_argument("--kind", choices=["abs_grad", "grad_x_update"], default="abs_grad", help="lab trace importance")
    ap.add_argument("--importance", choices=IMPORTANCES, default=None,
                    help="with --facts (default: posthoc, or posthoc_x_update with --base)")  # fmt: skip
    ap.add_argument("--scope", choices=["per_matrix", "global"], default="per_matrix")
    ap.add_argument("--draws", type=positive_int, default=5, help="random-mask draws per control")
    ap.add_argument("--count", type=positive_int, default=None, help="with --facts: the first facts only")
    ap.add_argument(
        "--consistency-facts", type=at_least(2), default=64, help="facts of the inside/outside gradient cosine"
    )
    ap.add_argument("--batch-size", type=positive_int, default=4, help="with --facts: per-example gradients at a time")
    ap.add_argument("--recall-format", choices=["query", "storage"], default="query",
                    help="with --facts: recall of the query texts (default) or of the first storage texts")  # fmt: skip
    ap.add_argument("--layers", nargs="+", type=int, default=None,
                    help="with --facts: rank only these layers' matrices (default: every layer)")  # fmt: skip
    return run_cli(_main, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
