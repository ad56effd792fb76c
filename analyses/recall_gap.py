"""The recall gap: exact-match recall of a two-stage and a mixed checkpoint per split and attribute.

    python analyses/recall_gap.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default
    python analyses/recall_gap.py --checkpoints smollm2-135m-instruct smollm2-135m-instruct \\
        --facts tests/data/facts.jsonl --out runs/smollm2

Writes OUT/recall.json (per regime: held-out / trained / validation QA, storage recall, per attribute) and
OUT/recall.html (grouped bars per attribute). With --facts: greedy exact match of every query and storage text of
your facts per split and relation, on any two checkpoints (query texts are scored with the end-of-text token after
the answer, as in the lab).
"""

import sys
from pathlib import Path

import plotly.graph_objects as go
from _common import pair, pair_parser

from mechrecall.cli import run_cli
from mechrecall.io import atomic_write_json, atomic_write_text
from mechrecall.loading import load_model
from mechrecall.tokenization import check_tokenization


def _lab(args) -> dict:
    from mechrecall.lab.evaluate import evaluate
    from mechrecall.lab.models import lab_dataset

    result = {}
    for regime, src in (("two_stage", pair(args)[0]), ("mixed", pair(args)[1])):
        lm = load_model(src, registry=args.registry, device=args.device, dtype=args.dtype)
        result[regime] = {"source": src, **evaluate(lm.model, lm.tokenizer, lab_dataset(lm))}
    return result


def _facts(args) -> dict:
    from mechrecall.facts import select_facts
    from mechrecall.loading import unique_labels
    from mechrecall.recall import recall
    from mechrecall.report.analysis import check_labels

    fs = select_facts(args.facts, args.split, None, formats=())
    labels = check_labels(args.labels, 2) or unique_labels(list(pair(args)))
    result: dict = {"facts": fs.source, "n_facts": len(fs), "labels": labels}
    for label, src in zip(labels, pair(args)):
        lm = load_model(src, registry=args.registry, device=args.device, dtype=args.dtype)
        check_tokenization(fs, lm.tokenizer, ("subject",), src)
        entry: dict = {"source": src}
        for fmt in ("query", "storage"):
            if not fs.examples(fmt):
                continue
            entry[fmt] = {"all": recall(lm.model, lm.tokenizer, fs, fmt=fmt)}
            for s in fs.splits:
                if fs.split(s).examples(fmt):
                    entry[fmt][s] = recall(lm.model, lm.tokenizer, fs, s, fmt=fmt)
            entry[f"{fmt}_per_relation"] = {
                r: recall(lm.model, lm.tokenizer, fs.where(lambda f, r=r: f.relation == r), fmt=fmt)
                for r in fs.relations
                if fs.where(lambda f, r=r: f.relation == r).examples(fmt)
            }
        result[label] = entry
    return result


def _main(args) -> int:
    result = _facts(args) if args.facts else _lab(args)
    out = Path(args.out)
    atomic_write_json(out / "recall.json", result)
    fig = go.Figure()
    if args.facts:
        for label in result["labels"]:
            for fmt in ("query", "storage"):
                per = result[label].get(f"{fmt}_per_relation", {})
                fig.add_trace(go.Bar(name=f"{label} · {fmt}", x=list(per), y=list(per.values())))
        fig.update_layout(title="Exact match per relation", yaxis_title="exact match", barmode="group")
        atomic_write_text(out / "recall.html", fig.to_html(include_plotlyjs=True))
        for label in result["labels"]:
            r = result[label]
            print(label, {fmt: round(r[fmt]["all"], 3) for fmt in ("query", "storage") if fmt in r})
        return 0
    from mechrecall.lab.bios import ATTRIBUTES

    for regime in ("two_stage", "mixed"):
        per = result[regime]["per_attribute"]["heldout_qa"]
        fig.add_trace(go.Bar(name=regime, x=list(ATTRIBUTES), y=[per[a] for a in ATTRIBUTES]))
    fig.update_layout(title="Held-out QA per attribute", yaxis_title="exact match", barmode="group")
    atomic_write_text(out / "recall.html", fig.to_html(include_plotlyjs=True))
    for regime in ("two_stage", "mixed"):
        r = result[regime]
        print(f"{regime}: held-out {r['heldout_qa']:.3f} trained {r['trained_qa']:.3f} storage {r['storage']:.3f}")
    return 0


def main(argv=None) -> int:
    return run_cli(_main, pair_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
