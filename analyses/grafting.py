"""Every protocol variant of grafting a mixed model's parameters into another (shared-base test: a pretrained pair).

    python analyses/grafting.py --family default-s0 --out runs/default/grafting
    python analyses/grafting.py --mixed runs/x/mixed/final --recipients two_stage=runs/x/two_stage/final \\
        stage1=runs/x/two_stage/stage1 --base runs/x/data/base --out runs/x/grafting

Donor: the mixed model. Recipients: the final two-stage model and the stage-1 (biography-only) model (``base`` too
with --with-base). Masks: the shared set of the donor's training trace (|gradient| and |gradient| x |update|) and the
top update size |theta_mixed - theta_base| (block matrices, or every parameter), each at --ks (default 0.01 % to
20 %, then 50 % and 100 %), against size-matched random masks
and the format-only sets (mechrecall.report.grafting). Writes OUT/grafting.json and grafting.html.
"""

import sys

from mechrecall.cli import Parser, add_model_args, fraction, positive_int, run_cli
from mechrecall.report.grafting import DEFAULT_KS, MASK_SOURCES, run, summary_rows


def _recipients(args) -> dict[str, str]:
    if args.recipients:
        out = {}
        for item in args.recipients:
            label, sep, source = item.partition("=")
            if not sep or not label or not source:
                raise ValueError(f"--recipients {item!r}: expected LABEL=CHECKPOINT")
            out[label] = source
    else:
        out = {"two_stage": f"{args.family}-two-stage", "stage1": f"{args.family}-two-stage-stage1"}
    if args.with_base:
        out["base"] = "base"
    return out


def _main(args) -> int:
    mixed = args.mixed or f"{args.family}-mixed"
    base = args.base
    if base is None:
        from mechrecall.loading import load_model
        from mechrecall.report.masks import base_source

        base = base_source(load_model(mixed, registry=args.registry), args.registry)
    result = run(mixed, _recipients(args), args.out, base=base, registry=args.registry, ks=args.ks,
                 sources=args.sources, draws=args.draws, seed=args.seed, scope=args.scope, device=args.device,
                 dtype=args.dtype)  # fmt: skip
    print("\n".join(summary_rows(result)))
    return 0


def main(argv=None) -> int:
    ap = Parser(description=__doc__)
    ap.add_argument("--family", default="default-s0", help="registry prefix of a reproduce seed (default-s0)")
    ap.add_argument("--mixed", default=None, help="the donor (default: FAMILY-mixed)")
    ap.add_argument("--recipients", nargs="+", default=None, metavar="LABEL=CHECKPOINT",
                    help="default: two_stage=FAMILY-two-stage stage1=FAMILY-two-stage-stage1")  # fmt: skip
    ap.add_argument("--with-base", action="store_true", help="graft into the base checkpoint too")
    ap.add_argument("--base", default=None, help="the family's base checkpoint (default: the registry's base_model)")
    ap.add_argument("--ks", type=fraction, nargs="+", default=list(DEFAULT_KS), help="mask sizes (fractions)")
    ap.add_argument("--sources", nargs="+", default=list(MASK_SOURCES), choices=MASK_SOURCES)
    ap.add_argument("--draws", type=positive_int, default=3, help="random-mask draws per variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scope", choices=["per_matrix", "global"], default="per_matrix")
    ap.add_argument("--registry", default=None, help="checkpoints.yaml (default: the project's)")
    ap.add_argument("--out", required=True, help="output folder")
    add_model_args(ap)
    return run_cli(_main, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
