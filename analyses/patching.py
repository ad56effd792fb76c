"""Finding: cross-format activation patching (storage of A -> query of B, held-out people) and noise tracing.

    python analyses/patching.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default

Writes OUT/patching.json and OUT/patching.html (mechrecall.report.patching.run_patching). For custom sweeps use
`python -m mechrecall.patching --help`.
"""

import sys

from _common import pair_parser

from mechrecall.report.patching import run_patching, summary_rows


def main(argv=None) -> int:
    ap = pair_parser(__doc__)
    ap.add_argument("--pairs", type=int, default=120)
    args = ap.parse_args(argv)
    result = run_patching(args.two_stage, args.mixed, args.out, registry=args.registry, n_pairs=args.pairs)
    print("\n".join(summary_rows(result, None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
