"""Finding: token-role attribution of storage-format recall (integrated gradients, grad x input, occlusion).

    python analyses/attribution.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default
    python analyses/attribution.py --checkpoints smollm2-135m-instruct smollm2-135m-instruct \\
        --facts tests/data/facts.jsonl --max-steps 64 --out runs/smollm2

Writes OUT/attribution.json and OUT/attribution.html (mechrecall.report.attribution.run_attribution). With --facts the
storage texts of your facts (the first of each fact) are attributed on any two checkpoints. Integrated gradients
start at --steps; each fact's steps double until its completeness gap is within 5 % (at most --max-steps). The
first position is held fixed (the attention sink of models trained without <bos>; --attribute-first attributes it).
"""

import sys

from _common import pair, pair_parser, user_kwargs

from mechrecall.cli import positive_int, run_cli
from mechrecall.report.attribution import run_attribution, summary_rows


def _main(args) -> int:
    result = run_attribution(*pair(args), args.out, registry=args.registry, n_people=args.people, steps=args.steps,
                             max_steps=args.max_steps, fix_first=not args.attribute_first, **user_kwargs(args))  # fmt: skip
    print("\n".join(summary_rows(result)))
    return 0


def main(argv=None) -> int:
    ap = pair_parser(__doc__)
    ap.add_argument("--people", "--count", dest="people", type=positive_int, default=20,
                    help="held-out people (6 facts each), or with --facts the first facts (default 20)")  # fmt: skip
    ap.add_argument("--steps", type=positive_int, default=16, help="first number of IG steps (default 16)")
    ap.add_argument("--max-steps", type=positive_int, default=256, help="IG step cap (default 256)")
    ap.add_argument("--attribute-first", action="store_true",
                    help="attribute position 0 too when it is not <bos> (IG converges badly on it)")  # fmt: skip
    return run_cli(_main, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
