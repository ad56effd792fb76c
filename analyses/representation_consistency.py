"""Finding: representation consistency of a two-stage / mixed checkpoint pair on held-out facts.

    python analyses/representation_consistency.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default

Runs mechrecall.consistency_report (gradient and representation measures, backend parity), then writes the
representation part as OUT/representation_consistency.json and its figure as OUT/representation_consistency.html.
"""

import sys
from pathlib import Path

from _common import pair_parser

from mechrecall.consistency_report import figures, run
from mechrecall.io import atomic_write_json, atomic_write_text


def main(argv=None) -> int:
    args = pair_parser(__doc__).parse_args(argv)
    result = run([args.two_stage, args.mixed], args.out, registry=args.registry, labels=["two_stage", "mixed"])
    out = Path(args.out)
    atomic_write_json(out / "representation_consistency.json", result["representation"])
    fig = figures(result)[0 if "representation" == "gradient" else 1]
    atomic_write_text(out / "representation_consistency.html", fig.to_html(include_plotlyjs=True))
    for regime, r in result["representation"].items():
        keys = (
            ("heldout_mean_cos", "baseline_mean_cos")
            if "representation" == "gradient"
            else ("subject_last_layer_margin", "final_last_layer_margin")
        )
        print(regime, {k: round(r[k], 3) for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
