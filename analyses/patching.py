"""Finding: cross-format activation patching (storage of A -> query of B, held-out people) and noise tracing.

    python analyses/patching.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default
    python analyses/patching.py --checkpoints smollm2-135m-instruct smollm2-135m-instruct \\
        --facts tests/data/facts.jsonl --layers 0 10 20 29 --out runs/smollm2

Writes OUT/patching.json and OUT/patching.html (mechrecall.report.patching.run_patching). With --facts, pairs are
drawn within each relation of your facts, on any two checkpoints; --sites and --layers narrow the sweep. For custom
sweeps use `python -m mechrecall.patching --help`.
"""

import sys

from _common import pair, pair_parser, user_kwargs

from mechrecall.cli import positive_int, run_cli
from mechrecall.report.patching import SITES, run_patching, summary_rows


def _main(args) -> int:
    result = run_patching(*pair(args), args.out, registry=args.registry, n_pairs=args.pairs, sites=args.sites,
                          layers=args.layers, **user_kwargs(args))  # fmt: skip
    print("\n".join(summary_rows(result)))
    return 0


def main(argv=None) -> int:
    ap = pair_parser(__doc__)
    ap.add_argument("--pairs", "--count", dest="pairs", type=positive_int, default=120, help="fact pairs (default 120)")
    ap.add_argument("--sites", nargs="+", choices=SITES, default=list(SITES), help="activation sites (default: all)")
    ap.add_argument("--layers", nargs="+", type=int, default=None, help="layers to patch (default: every layer)")
    return run_cli(_main, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
