"""``python -m mechrecall``: the lab's command line.

    python -m mechrecall reproduce [--preset default] [--out runs/default] [--seeds 0 1 2] [--force]
    python -m mechrecall train --regime mixed --out runs/x          (same as python -m mechrecall.lab.train)
    python -m mechrecall eval CHECKPOINT [--facts FILE] [--device cuda] (registry name, folder, HF id, .gguf)
    python -m mechrecall registry                                    (list checkpoints.yaml)
    python -m mechrecall presets                                     (list presets and their settings)
    python -m mechrecall report runs/default                         (rebuild runs/default/report.html)
    python -m mechrecall analyze TWO_STAGE MIXED --out DIR [--only masks patching]   (every registered analysis)
    python -m mechrecall analyze --list                              (the registered analyses)
    python -m mechrecall.patching --help                             (activation patching CLI)

Errors (unknown preset, malformed registry, missing checkpoint, finished output folder) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mechrecall.tokenization import check_tokenization


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from mechrecall.lab.train import training_device_kwargs
    from mechrecall.report.reproduce import reproduce

    out = args.out or f"runs/{args.preset}"
    results = reproduce(
        args.preset,
        out,
        seeds=args.seeds,
        overrides=args.overrides,
        force=args.force,
        registry=args.registry,
        progress=not args.quiet,
        analyses=not args.no_analyses,
        training=training_device_kwargs(args),
        extra_regimes=args.also,
    )
    from mechrecall.report.reproduce import markdown_table

    print(markdown_table(results))
    print(f"wrote {out}/results.json and {out}/results.md")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mechrecall.loading import load_model

    if args.facts is None and (args.match != "exact" or args.chat_template or args.split is not None):
        raise ValueError("--match, --chat-template and --split apply to --facts FILE; a lab checkpoint's own people "
                         "are scored by exact match")  # fmt: skip

    loaded = load_model(args.checkpoint, registry=args.registry, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.facts is not None:
        result = _eval_facts(model, tokenizer, args.facts, args.split, args.checkpoint, args.chat_template, args.match)
        print(json.dumps(result, indent=2))
        return 0
    from mechrecall.lab.evaluate import evaluate
    from mechrecall.lab.models import lab_dataset

    metrics = evaluate(model, tokenizer, lab_dataset(loaded))
    print(
        json.dumps(
            metrics if args.per_attribute else {k: v for k, v in metrics.items() if k != "per_attribute"}, indent=2
        )
    )
    return 0


def _eval_facts(
    model, tokenizer, path: str, split: str | None, source: str, chat: bool = False, match: str = "exact"
) -> dict:
    """Recall of a fact file's texts, per format and split: exact match (every answer token, + end-of-text for
    queries), or with ``match="in-reply"`` the answer anywhere in a greedy reply (:func:`answer_in_reply`)."""
    from mechrecall.facts import load_facts
    from mechrecall.recall import answer_in_reply, recall

    def score(fmt: str, split: str | None = None) -> float:
        if match == "exact":
            return recall(model, tokenizer, facts, split, fmt=fmt)
        return float(answer_in_reply(model, tokenizer, facts.examples(fmt, split)).float().mean())

    facts = load_facts(path).split(split)
    if not len(facts):
        raise ValueError(f"{path}: no fact has split {split!r}")
    if chat:
        facts = facts.with_chat_template(tokenizer)
    check_tokenization(facts, tokenizer, ("subject",), source)
    out: dict = {"facts": str(path), "n_facts": len(facts), "match": match}
    for fmt in ("storage", "query"):
        if not facts.examples(fmt):
            continue
        out[fmt] = score(fmt)
        out[f"{fmt}_per_split"] = {s: score(fmt, s) for s in facts.splits if facts.examples(fmt, s)}
    return out


def _cmd_registry(args: argparse.Namespace) -> int:
    from mechrecall.registry import default_path, load_registry

    reg = load_registry(args.registry or default_path())
    for e in reg.checkpoints:
        metrics = " ".join(f"{k}={v:.3f}" for k, v in e.metrics.items() if k in ("heldout_qa", "trained_qa", "storage"))
        print(f"{e.name:32s} {e.regime:10s} {e.stage:8s} {e.path}  {metrics}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mechrecall.report.page import build

    print(f"wrote {build(args.run)}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    """Every registered analysis (or ``--only`` some) of a lab checkpoint pair, each its JSON and figures, then the
    summary tables in OUT/results.md."""
    from pathlib import Path

    from mechrecall.io import atomic_write_text
    from mechrecall.report.analysis import analyses, get_analysis
    from mechrecall.report.reproduce import analyses_markdown, markdown_table

    if args.list:
        for a in analyses():
            how = "written beside a run by its analyses/ script" if a.beside else "runs on a pair"
            print(f"{a.name:12s} {a.output:18s} {how}")
        return 0
    if len(args.pair) != 2 or args.out is None:
        raise ValueError("analyze needs two checkpoints (reference first, e.g. TWO_STAGE MIXED) and --out DIR")
    chosen = [get_analysis(n) for n in args.only] if args.only else [a for a in analyses() if a.run_pair]
    if not all(a.run_pair for a in chosen):
        raise ValueError(f"{', '.join(a.name for a in chosen if not a.run_pair)}: written by its analyses/ script")
    context = _pair_context(args.pair[1], args.registry)
    for a in chosen:
        a.run_pair(*args.pair, args.out, registry=args.registry, labels=args.labels, context=context)
        print(f"wrote {Path(args.out) / a.output}")
    out = Path(args.out)
    # a reproduce folder keeps its recall tables: results.md is rebuilt from its results.json, not replaced
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    head = markdown_table(results) if results is not None else ""
    atomic_write_text(out / "results.md", head + analyses_markdown(out))
    return 0


def _pair_context(source: str, registry):
    """What ``reproduce`` tells the analyses about a lab pair, read from the checkpoint: its preset (so a pretrained
    base gets the smaller sizes, and a run without a gradient trace post-hoc masks) and its starting checkpoint. Any
    other checkpoint: no context."""
    from pathlib import Path

    from mechrecall.checkpoint import read_meta
    from mechrecall.lab.config import Preset
    from mechrecall.registry import resolve
    from mechrecall.report.analysis import PairContext
    from mechrecall.report.masks import base_of

    location, _ = resolve(source, registry)
    config = read_meta(location).get("config") if Path(location).is_dir() else None
    if config is None:
        return PairContext()
    preset = Preset.model_validate(config)
    base = None if preset.trace else base_of(source, location, registry)
    return PairContext(preset=preset, base=base, pretrained=preset.model.source is not None)


def _cmd_presets(args: argparse.Namespace) -> int:
    from mechrecall.lab.config import PRESETS

    for name, p in PRESETS.items():
        print(f"{name}: {json.dumps(p.model_dump(mode='json'))}")
    return 0


def add_model_args(ap: argparse.ArgumentParser) -> None:
    from mechrecall.cli import add_model_args as add

    add(ap)


def build_parser() -> argparse.ArgumentParser:
    from mechrecall.cli import Parser

    ap = Parser(prog="python -m mechrecall", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("reproduce", help="data, both regimes, evaluation, registry, results.json")
    rp.add_argument("--preset", default="default")
    rp.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    rp.add_argument("--seeds", type=int, nargs="+", default=[0])
    rp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    rp.add_argument("--force", action="store_true", help="delete a finished run in --out and redo it")
    rp.add_argument(
        "--registry", default=None, help="registry file (default $MECHRECALL_REGISTRY or ./checkpoints.yaml)"
    )
    rp.add_argument("--quiet", action="store_true")
    rp.add_argument("--no-analyses", action="store_true", help="train and evaluate only (no analyses, no report)")
    rp.add_argument("--also", nargs="+", default=[], metavar="REGIME",
                    help="further regimes to train and tabulate (pre-instruction)")  # fmt: skip
    from mechrecall.lab.train import add_training_device_args

    add_training_device_args(rp)
    rp.set_defaults(func=_cmd_reproduce)
    ev = sub.add_parser("eval", help="exact-match recall of one checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--registry", default=None)
    ev.add_argument("--per-attribute", action="store_true")
    ev.add_argument("--facts", default=None, metavar="FILE", help="your own facts (any checkpoint; mechrecall.facts)")
    ev.add_argument("--split", default=None, help="with --facts: only this split's facts")
    ev.add_argument("--chat-template", action="store_true",
                    help="with --facts: wrap query texts in the tokenizer's chat template (instruct models)")  # fmt: skip
    ev.add_argument("--match", choices=("exact", "in-reply"), default="exact",
                    help="with --facts: exact match of the answer (default), or the answer anywhere in a greedy "
                         "32-token reply (an upper bound for models that answer in sentences)")  # fmt: skip
    add_model_args(ev)
    ev.set_defaults(func=_cmd_eval)
    rg = sub.add_parser("registry", help="list registered checkpoints")
    rg.add_argument("--registry", default=None)
    rg.set_defaults(func=_cmd_registry)
    rpt = sub.add_parser("report", help="(re)build DIR/report.html from a reproduce folder")
    rpt.add_argument("run", help="a reproduce output folder (holds results.json)")
    rpt.set_defaults(func=_cmd_report)
    an = sub.add_parser("analyze", help="the registered analyses of a checkpoint pair (reference first)")
    an.add_argument("pair", nargs="*", metavar="CHECKPOINT", help="two checkpoints: reference first (two-stage)")
    an.add_argument("--out", default=None, help="output folder")
    an.add_argument("--only", type=lambda s: [n for n in s.split(",") if n], default=None, metavar="NAME[,NAME]",
                    help="these analyses only, comma-separated (see --list)")  # fmt: skip
    an.add_argument("--labels", nargs=2, default=None, help="names of the two checkpoints in the JSON")
    an.add_argument("--registry", default=None)
    an.add_argument("--list", action="store_true", help="list the registered analyses")
    an.set_defaults(func=_cmd_analyze)
    ps = sub.add_parser("presets", help="list presets")
    ps.set_defaults(func=_cmd_presets)
    tr = sub.add_parser("train", help="train one regime (see python -m mechrecall.lab.train --help)", add_help=False)
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(func=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import mechrecall.cli  # noqa: F401  (the command line's environment, before anything imports transformers)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from mechrecall.lab.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    from mechrecall.checkpoint import CheckpointError
    from mechrecall.cli import check_out
    from mechrecall.registry import RegistryError
    from mechrecall.report.reproduce import RunExistsError

    try:
        if args.command == "reproduce":
            check_out(args.out or f"runs/{args.preset}")
        if args.command == "analyze" and args.out is not None:
            check_out(args.out)
        return args.func(args)
    except (RunExistsError, RegistryError, CheckpointError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
