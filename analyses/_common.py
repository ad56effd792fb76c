"""Shared pieces of the analysis scripts: a two-stage / mixed checkpoint pair, an output folder, consistency parts."""

import argparse
from pathlib import Path


def pair_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--two-stage", default="default-s0-two-stage", help="registry name or folder")
    ap.add_argument("--mixed", default="default-s0-mixed", help="registry name or folder")
    ap.add_argument("--registry", default=None, help="checkpoints.yaml (default: the project's)")
    ap.add_argument("--out", required=True, help="output folder")
    return ap


def consistency_part(part: str, doc: str, argv=None) -> int:
    """Run the consistency report on the pair and write its ``part`` ("gradient" or "representation") on its own."""
    from mechrecall.io import atomic_write_json, atomic_write_text
    from mechrecall.report.consistency import figures, run

    args = pair_parser(doc).parse_args(argv)
    result = run([args.two_stage, args.mixed], args.out, registry=args.registry, labels=["two_stage", "mixed"])
    out = Path(args.out)
    atomic_write_json(out / f"{part}_consistency.json", result[part])
    fig = figures(result)[0 if part == "gradient" else 1]
    atomic_write_text(out / f"{part}_consistency.html", fig.to_html(include_plotlyjs=True))
    keys = {"gradient": ("heldout_mean_cos", "baseline_mean_cos"),
            "representation": ("subject_last_layer_margin", "final_last_layer_margin")}[part]  # fmt: skip
    for regime, r in result[part].items():
        print(regime, {k: round(r[k], 3) for k in keys})
    return 0
