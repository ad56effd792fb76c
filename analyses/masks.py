"""Shared-update parameter masks of a two-stage / mixed checkpoint pair (the paper's finding 3).

    python analyses/masks.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default

Ranks parameters by the training trace saved with each checkpoint (per-format mean |gradient|, or --kind
grad_x_update), takes the top --k per format, intersects them, and measures: the shared set's size against the
random-overlap expectation, where it lies (layers, heads, neurons), gradient consistency inside vs outside it,
held-out QA after resetting it to the base weights (against size-matched random masks and format-only masks), and
the recipient's held-out QA after grafting it into the other regime's model. Writes OUT/masks.json and masks.html.
"""

import argparse
import sys

from mechrecall.report.masks import run, summary_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--two-stage", default="default-s0-two-stage", help="registry name or folder")
    ap.add_argument("--mixed", default="default-s0-mixed", help="registry name or folder")
    ap.add_argument("--base", default=None, help="base checkpoint (default: the registry entry's base_model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--registry", default=None)
    ap.add_argument("--k", type=float, default=0.05, help="top fraction per format (default 0.05)")
    ap.add_argument("--kind", choices=["abs_grad", "grad_x_update"], default="abs_grad")
    ap.add_argument("--scope", choices=["per_matrix", "global"], default="per_matrix")
    ap.add_argument("--draws", type=int, default=5, help="random-mask draws per control")
    args = ap.parse_args(argv)
    result = run(
        args.two_stage, args.mixed, args.out, base=args.base, registry=args.registry, k=args.k, kind=args.kind,
        scope=args.scope, draws=args.draws,
    )  # fmt: skip
    print("\n".join(summary_rows(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
