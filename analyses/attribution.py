"""Finding: token-role attribution of storage-format recall (integrated gradients, grad x input, occlusion).

    python analyses/attribution.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default

Writes OUT/attribution.json and OUT/attribution.html (mechrecall.report.patching.run_attribution).
"""

import sys

from _common import pair_parser

from mechrecall.report.patching import run_attribution, summary_rows


def main(argv=None) -> int:
    ap = pair_parser(__doc__)
    ap.add_argument("--people", type=int, default=20, help="held-out people (6 facts each)")
    args = ap.parse_args(argv)
    result = run_attribution(args.two_stage, args.mixed, args.out, registry=args.registry, n_people=args.people)
    print("\n".join(summary_rows(None, result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
