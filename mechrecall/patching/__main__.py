"""python -m mechrecall.patching: activation patching between formats and facts, on lab checkpoints or any model.

Activation patching copies one activation from a *source* run into a *base* run and measures how the base's
output moves. Here the source is the SOURCE_FORMAT prompt of fact A and the base the BASE_FORMAT prompt of another
fact B of the same relation (--mode cross_fact), or of A itself (--mode same_fact); positions are matched by role
(subject, relation, final = the token before the answer), since the formats differ in length. The metric is read at
the base's answer position: logit_diff = logit(A's value) - logit(B's value), hit = the base now answers A's
value, logprob / prob / rank of A's value (first answer token); answer_logprob = log P(A's whole value, every token,
teacher-forced) and answer_match = every token of A's value is the argmax (the default with --facts: BPE answers are
often several tokens).

With --corruption noise the experiment is ROME's causal tracing instead: base = the BASE_FORMAT prompts with noise
(3 x embedding std) on the subject tokens, source = the same prompts clean; --granularity position then sweeps every
prompt position rather than the three roles.

Facts: a lab checkpoint brings its own (the people of --split, default heldout, first --people of them); any
checkpoint (--model / --checkpoint: registry name, folder, Hugging Face id, .gguf) takes --facts FILE, your own
facts (see mechrecall.facts; all of them, or those of --split). A role no text of the facts has (relation without
relation_text or spans) is left out of the sweep.

examples:
  python -m mechrecall.patching --checkpoint default-s0-mixed --out runs/patch_mixed
  python -m mechrecall.patching --checkpoint runs/default/seed0/two_stage/final --sites resid_pre head \\
      --metric hit --split train --count 60 --out runs/patch_two
  python -m mechrecall.patching --checkpoint default-s0-mixed --corruption noise --granularity position \\
      --metric prob --out runs/trace_mixed
  python -m mechrecall.patching --model smollm2-135m-instruct --facts tests/data/facts.jsonl --out runs/patch_smol

Writes OUT/patching.json (settings, per-site mean and per-example values), OUT/patching.parquet (tidy: one row per
patch x example) and OUT/patching.html (plotly heatmaps). Bad input (unknown checkpoints or architectures, a device
or dtype this machine cannot run, malformed fact records, roles that land on no token, bad option combinations)
ends with one `error:` line on stderr, exit status 2, and nothing written to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from mechrecall.cli import Parser, add_model_args, at_least, positive_int, run_cli
from mechrecall.facts import checkpoint_facts, select_facts, subjects_first
from mechrecall.io import atomic_write_files
from mechrecall.loading import load_each, unique_labels
from mechrecall.patching.core import (
    METRICS,
    SITES,
    WHOLE_ANSWER_METRICS,
    GaussianNoise,
    activation_patch,
    get_metric,
    is_whole_answer,
)
from mechrecall.patching.prompts import FORMATS, fact_inputs, fact_pairs, patch_roles
from mechrecall.patching.record import best_site, metric_mean, model_record, patching_record, site_record
from mechrecall.tokenization import check_tokenization

__all__ = ["parser", "run", "main"]

BACKENDS = ("hf", "transformer_lens", "nnsight")
LAB_SPLITS = ("heldout", "train", "validation")


def parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="python -m mechrecall.patching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, nargs="+",
                    help="registry name(s), checkpoint folder(s), Hugging Face id(s) or .gguf file(s)")  # fmt: skip
    ap.add_argument("--registry", default=None, help="checkpoints.yaml to resolve names (default: the project's)")
    ap.add_argument("--facts", default=None, metavar="FILE",
                    help="your own facts (.jsonl / .json; mechrecall.facts); default: a lab checkpoint's people. "
                         "(A split name here is read as --split, as before.)")  # fmt: skip
    ap.add_argument("--split", default=None, help="whose facts: a split (lab default heldout; with --facts: all)")
    ap.add_argument("--count", type=positive_int, default=60, help="number of fact pairs (default 60)")
    ap.add_argument("--people", type=at_least(2), default=40, help="lab: people to draw pairs from (default 40)")
    ap.add_argument("--source-format", choices=FORMATS, default="storage")
    ap.add_argument("--base-format", choices=FORMATS, default="query")
    ap.add_argument("--mode", choices=["cross_fact", "same_fact"], default="cross_fact")
    ap.add_argument("--sites", nargs="+", choices=SITES, default=["resid_pre"], help="activation sites")
    ap.add_argument("--layers", nargs="+", type=int, default=None, help="layers to patch (default: every layer)")
    ap.add_argument("--granularity", choices=["role", "position"], default="role", help="position needs --corruption")
    ap.add_argument("--metric", nargs="+", choices=sorted(METRICS), default=None,
                    help="one or more (measured from the same forwards); default: answer_logprob (the whole answer, teacher-forced) with --facts, else logit_diff "
                         "(first answer token, A's value - B's value); answer_match = every answer token is the argmax")  # fmt: skip
    ap.add_argument("--backend", choices=BACKENDS, default="hf")
    ap.add_argument("--corruption", choices=["none", "noise"], default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder")
    add_model_args(ap)
    return ap


def _wrap(loaded, backend: str):
    if backend == "transformer_lens":
        from mechrecall.loading import to_transformer_lens

        return to_transformer_lens(loaded)
    if backend == "nnsight":
        from mechrecall.loading import to_nnsight

        return to_nnsight(loaded)
    return loaded.model


def _check(args) -> None:
    """Option combinations and --layers, before any model is loaded."""
    if args.granularity == "position" and args.corruption == "none":
        raise ValueError("--granularity position needs --corruption noise (formats and facts differ in length)")
    if args.corruption == "noise" and args.backend != "hf":
        raise ValueError("--corruption noise runs on --backend hf only")
    if args.facts in LAB_SPLITS and not Path(args.facts).exists():  # the old --facts SPLIT
        if args.split not in (None, args.facts):
            raise ValueError(f"--facts {args.facts} (a split) contradicts --split {args.split}")
        args.facts, args.split = None, args.facts
    if args.count < 1:
        raise ValueError(f"--count {args.count}: need at least one pair")
    if args.metric is None:
        args.metric = ["answer_logprob" if args.facts is not None else "logit_diff"]
    args.metric = list(dict.fromkeys(args.metric))
    if len({is_whole_answer(get_metric(m)) for m in args.metric}) > 1:
        raise ValueError(f"--metric {' '.join(args.metric)}: whole-answer metrics ({', '.join(WHOLE_ANSWER_METRICS)}) "
                         f"and first-token metrics need different prompts; run them separately")  # fmt: skip


def _facts(args, loaded, user):
    """The facts to patch on: --facts (its --split), or the facts file beside a training run's checkpoint (the first
    --people people of --split, default heldout)."""
    if user is not None:
        return user
    own = checkpoint_facts(loaded.location, loaded.meta)
    return subjects_first(select_facts(own, args.split or "heldout", formats=()), args.people)


def _experiment(args, loaded, facts, roles, whole: bool):
    """(base inputs, source inputs, the pairs' facts, pair counts, corruption) for one model: cross-format / cross-fact
    pairs, or with --corruption noise each base prompt its own clean source (one prompt length for --granularity
    position)."""
    if args.corruption == "noise":
        examples = facts.examples(args.base_format, templates=[0])
        base = fact_inputs(loaded.tokenizer, examples[: args.count], roles=roles, whole_answer=whole)
        source, corruption = base, GaussianNoise(3.0, seed=args.seed)
        kept = examples[: args.count]
        if args.granularity == "position":  # positions are comparable only across prompts of one length
            readout = base.readout.tolist()
            common = max(set(readout), key=readout.count)
            kept = [ex for ex, r in zip(kept, readout) if r == common]
            base = source = fact_inputs(loaded.tokenizer, kept, roles=roles, whole_answer=whole).all_positions()
        pairs = [{"subject": ex.subject_id, "relation": ex.relation} for ex in kept]  # (each its own source)
        stats = {"asked": args.count, "available": min(args.count, len(examples)), "kept": len(kept)}
        if len(kept) < stats["available"]:
            stats["other_length"] = stats["available"] - len(kept)
    else:
        stats = {"asked": args.count}
        base, source, pairs = fact_pairs(
            facts, loaded.tokenizer, source_format=args.source_format, base_format=args.base_format,
            mode=args.mode, n=args.count, seed=args.seed, roles=roles, whole_answer=whole, stats=stats,
        )  # fmt: skip
        corruption = None
    return base, source, pairs, stats, corruption


def run(args) -> dict:
    from mechrecall.arch import n_layers

    _check(args)
    whole = is_whole_answer(get_metric(args.metric[0]))
    out = Path(args.out)
    user = select_facts(args.facts, args.split, None, formats=()) if args.facts is not None else None
    names = unique_labels(args.checkpoint)
    models: dict = {}
    frames = []
    loads = load_each(args.checkpoint, registry=args.registry, device=args.device, dtype=args.dtype)  # twice: once
    for name, loaded in zip(names, loads):
        bad = [L for L in args.layers or () if not 0 <= L < n_layers(loaded.model)]
        if bad:
            raise ValueError(f"--layers {bad[0]}: {name} has layers 0..{n_layers(loaded.model) - 1}")
    for name, source_name, loaded in zip(names, args.checkpoint, loads):
        facts = _facts(args, loaded, user)
        formats = (args.base_format,) if args.corruption == "noise" else (args.source_format, args.base_format)
        facts.require(*formats)
        roles = patch_roles(facts, formats)
        if user is not None:
            check_tokenization(facts, loaded.tokenizer, roles, source_name)
        base, source, pairs, stats, corruption = _experiment(args, loaded, facts, roles, whole)
        model = _wrap(loaded, args.backend)
        per_site = {}
        for site in args.sites:
            r = activation_patch(model, base, source, site=site, metric=args.metric, backend=args.backend,
                                 corruption=corruption, layers=args.layers)  # fmt: skip
            per_site[site] = site_record(r)
            for one in r.values():
                df = one.to_dataframe()
                df.insert(0, "checkpoint", name)
                frames.append(df)
        models[name] = model_record(source_name, pairs, roles, per_site, stats)
    if user is not None:
        described = {"source": user.source, "n_facts": len(user), "relations": user.relations}
    else:  # the facts file beside each checkpoint
        described = {"source": "each checkpoint's own facts", "split": args.split or "heldout", "people": args.people}
    result = patching_record(vars(args), models, described)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(frames, ignore_index=True)
    tmp = out / ".patching.parquet.tmp"
    table.to_parquet(tmp)
    page = _html(result)
    tmp.replace(out / "patching.parquet")  # (the JSON and page follow at once; the parquet is the JSON's rows)
    atomic_write_files(out, {"patching.json": result, "patching.html": page})
    return result


def _html(result: dict) -> str:
    import plotly.graph_objects as go

    from mechrecall.plotting import page as html

    figs = []
    for name, m in result["models"].items():
        for site, s in m["sites"].items():
            by_head = "head" in s["axes"]
            for metric, rec in s["metrics"].items():
                z = [row for layer in rec["mean"] for row in layer] if by_head else rec["mean"]
                fig = go.Figure(go.Heatmap(z=z, x=s["labels"]["pos"], colorscale="Viridis"))
                fig.update_layout(title=f"{name} · {site} · mean {metric} after patching (base {rec['base_mean']:.3f})",
                                  xaxis_title="position", yaxis_title="layer x head" if by_head else "layer")  # fmt: skip
                figs.append(fig)
    return html(figs, "mechrecall.patching")


def _pairs_line(name: str, m: dict) -> str:
    c = m["pair_counts"]
    line = f"{name}: {c['kept']} pairs"
    if "candidates" in c and c["same_first_token"]:
        line += (f" of {c['candidates']} formed ({c['same_first_token']} dropped: the two answers begin with the same "
                 f"token, which the first-token metrics cannot tell apart)")  # fmt: skip
    if c.get("other_length"):
        line += (f" ({c['other_length']} prompts of another length left out: positions compare only across prompts "
                 f"of one length)")  # fmt: skip
    if c["asked"] > c["available"]:
        line += f"; --count {c['asked']} asked for more than the {c['available']} available"
    return line


def _main(args) -> int:
    result = run(args)
    for name, m in result["models"].items():
        print(_pairs_line(name, m))
        for site, s in m["sites"].items():
            for metric, rec in s["metrics"].items():
                best = best_site(s, metric)
                at = ", ".join(f"{k} {v}" for k, v in best.items() if k != "value")
                print(f"{name} {site}: {metric} unpatched {rec['base_mean']:.3f}; best patch {best['value']:.3f} at "
                      f"{at}; worst {float(metric_mean(s, metric).min()):.3f} ({m['n']} examples)")  # fmt: skip
    print(f"wrote {Path(args.out) / 'patching.json'} (per-pair facts under models.<name>.pairs), patching.parquet, "
          f"patching.html")  # fmt: skip
    return 0


def main(argv=None) -> int:
    return run_cli(_main, parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
