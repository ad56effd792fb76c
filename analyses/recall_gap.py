"""The recall gap: exact-match recall of a two-stage and a mixed checkpoint per split and attribute.

    python analyses/recall_gap.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default

Writes OUT/recall.json (per regime: held-out / trained / validation QA, storage recall, per attribute) and
OUT/recall.html (grouped bars per attribute).
"""

import sys
from pathlib import Path

import plotly.graph_objects as go
from _common import pair_parser

from mechrecall.io import atomic_write_json, atomic_write_text
from mechrecall.lab.bios import ATTRIBUTES
from mechrecall.lab.evaluate import evaluate
from mechrecall.lab.models import lab_dataset
from mechrecall.loading import load_model


def main(argv=None) -> int:
    args = pair_parser(__doc__).parse_args(argv)
    result = {}
    for regime, src in (("two_stage", args.two_stage), ("mixed", args.mixed)):
        lm = load_model(src, registry=args.registry)
        result[regime] = {"source": src, **evaluate(lm.model, lm.tokenizer, lab_dataset(lm))}
    out = Path(args.out)
    atomic_write_json(out / "recall.json", result)
    fig = go.Figure()
    for regime in ("two_stage", "mixed"):
        per = result[regime]["per_attribute"]["heldout_qa"]
        fig.add_trace(go.Bar(name=regime, x=list(ATTRIBUTES), y=[per[a] for a in ATTRIBUTES]))
    fig.update_layout(title="Held-out QA per attribute", yaxis_title="exact match", barmode="group")
    atomic_write_text(out / "recall.html", fig.to_html(include_plotlyjs=True))
    for regime in ("two_stage", "mixed"):
        r = result[regime]
        print(f"{regime}: held-out {r['heldout_qa']:.3f} trained {r['trained_qa']:.3f} storage {r['storage']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
