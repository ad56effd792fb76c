"""Shared pieces of the analysis scripts: a checkpoint pair, your own facts, device / dtype, an output folder.

Every script runs on the lab's two-stage / mixed pair by default (``--two-stage`` / ``--mixed``, registry names or
folders), or on any two checkpoints with ``--checkpoints A B`` (registry names, folders, Hugging Face ids, ``.gguf``
files; the same one twice is fine) and ``--facts FILE`` (a fact file, see ``mechrecall.facts``). Bad input (an
unknown checkpoint, architecture, device or dtype, a malformed fact record) ends with one ``error:`` line on stderr,
exit status 2, and nothing written to ``--out``.
"""

import argparse
from pathlib import Path

from mechrecall.cli import Parser, add_model_args, at_least, positive_int, run_cli


def pair_parser(doc: str) -> argparse.ArgumentParser:
    ap = Parser(description=doc)
    ap.add_argument("--two-stage", default="default-s0-two-stage", help="registry name or folder")
    ap.add_argument("--mixed", default="default-s0-mixed", help="registry name or folder")
    add_user_args(ap)
    return ap


def add_user_args(ap: argparse.ArgumentParser, *, checkpoints: bool = True) -> None:
    """``--checkpoints A B``, ``--labels``, ``--facts``, ``--split``, ``--registry``, ``--out``, ``--device``, ``--dtype``."""
    if checkpoints:
        ap.add_argument("--checkpoints", nargs=2, metavar=("A", "B"), default=None,
                        help="any two checkpoints instead of --two-stage / --mixed (name, folder, HF id, .gguf)")  # fmt: skip
    ap.add_argument("--labels", nargs="+", default=None, help="names for the checkpoints in the JSON and figures")
    ap.add_argument("--facts", default=None, metavar="FILE",
                    help="your own facts (.jsonl / .json, see mechrecall.facts) instead of the lab's held-out people")  # fmt: skip
    ap.add_argument("--split", default=None, help="with --facts: only facts of this split (default: all)")
    ap.add_argument("--registry", default=None, help="checkpoints.yaml (default: the project's)")
    ap.add_argument("--out", required=True, help="output folder")
    add_model_args(ap)


def pair(args) -> tuple[str, str]:
    """The two checkpoints: ``--checkpoints A B`` or ``--two-stage`` / ``--mixed``."""
    return tuple(args.checkpoints) if args.checkpoints else (args.two_stage, args.mixed)


def user_kwargs(args) -> dict:
    """The keyword arguments every report function takes for facts, labels, device and dtype."""
    return {"facts": args.facts, "split": args.split, "labels": args.labels, "device": args.device,
            "dtype": args.dtype}  # fmt: skip


def consistency_part(part: str, doc: str, argv=None) -> int:
    """Run the consistency report on the pair and write its ``part`` ("gradient" or "representation") on its own."""
    ap = pair_parser(doc)
    ap.add_argument(
        "--count", type=positive_int, default=200, help="held-out people, or with --facts facts (default 200)"
    )
    ap.add_argument(
        "--grad-facts", type=at_least(2), default=240, help="facts whose per-example gradients are compared"
    )
    ap.add_argument("--no-parity", action="store_true", help="skip the TransformerLens / nnsight logit checks")
    return run_cli(lambda a: _consistency_part(part, a), ap.parse_args(argv))


def _consistency_part(part: str, args) -> int:
    from mechrecall.io import atomic_write_files
    from mechrecall.report.consistency import figures, run

    labels = args.labels or (None if args.facts or args.checkpoints else ["two_stage", "mixed"])
    result = run(list(pair(args)), args.out, registry=args.registry, n_people=args.count, grad_facts=args.grad_facts,
                 parity=not args.no_parity, **{**user_kwargs(args), "labels": labels})  # fmt: skip
    out = Path(args.out)
    fig = figures(result)[0 if part == "gradient" else 1]
    page = fig.to_html(include_plotlyjs=True)
    atomic_write_files(out, {f"{part}_consistency.json": result[part], f"{part}_consistency.html": page})
    keys = {"gradient": ("same_fact_mean_cos", "baseline_mean_cos"),
            "representation": ("subject_last_layer_margin", "final_last_layer_margin")}[part]  # fmt: skip
    for regime, r in result[part].items():
        print(regime, {k: round(r[k], 3) for k in keys})
    return 0
