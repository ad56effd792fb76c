"""python -m mechrecall.patching: activation patching between formats and facts on lab checkpoints.

Activation patching copies one activation from a *source* run into a *base* run and measures how the base's
output moves. Here the source is the SOURCE_FORMAT prompt of person A and the base the BASE_FORMAT prompt of person
B for the same attribute (--mode cross_fact), or of A itself (--mode same_fact); positions are matched by role
(subject, relation, final = the token before the answer), since the formats differ in length. The metric is read at
the base's answer position: logit_diff = logit(A's value) - logit(B's value), hit = the base now answers A's
value, logprob / prob / rank of A's value.

With --corruption noise the experiment is ROME's causal tracing instead: base = the BASE_FORMAT prompts with noise
(3 x embedding std) on the subject tokens, source = the same prompts clean; --granularity position then sweeps every
prompt position rather than the three roles.

examples:
  python -m mechrecall.patching --checkpoint default-s0-mixed --out runs/patch_mixed
  python -m mechrecall.patching --checkpoint runs/default/seed0/two_stage/final --sites resid_pre head \\
      --metric hit --facts train --count 60 --out runs/patch_two
  python -m mechrecall.patching --checkpoint default-s0-mixed --corruption noise --granularity position \\
      --metric prob --out runs/trace_mixed

Writes OUT/patching.json (settings, per-site mean and per-example values), OUT/patching.parquet (tidy: one row per
patch x example) and OUT/patching.html (plotly heatmaps). Exit status 2 with a one-line reason on bad arguments,
unknown checkpoints, or prompts whose roles cannot be located.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from mechrecall.io import atomic_write_json, atomic_write_text
from mechrecall.patching.core import METRICS, SITES, GaussianNoise, activation_patch
from mechrecall.patching.prompts import FORMATS, fact_inputs, fact_pairs

BACKENDS = ("hf", "transformer_lens", "nnsight")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mechrecall.patching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", required=True, nargs="+", help="registry name(s) or checkpoint folder(s)")
    ap.add_argument("--registry", default=None, help="checkpoints.yaml to resolve names (default: the project's)")
    ap.add_argument("--facts", choices=["heldout", "train", "validation"], default="heldout", help="whose facts")
    ap.add_argument("--count", type=int, default=60, help="number of fact pairs (default 60)")
    ap.add_argument("--people", type=int, default=40, help="people to draw pairs from (default 40)")
    ap.add_argument("--source-format", choices=FORMATS, default="storage")
    ap.add_argument("--base-format", choices=FORMATS, default="query")
    ap.add_argument("--mode", choices=["cross_fact", "same_fact"], default="cross_fact")
    ap.add_argument("--sites", nargs="+", choices=SITES, default=["resid_pre"], help="activation sites")
    ap.add_argument("--granularity", choices=["role", "position"], default="role", help="position needs --corruption")
    ap.add_argument("--metric", choices=sorted(METRICS), default="logit_diff")
    ap.add_argument("--backend", choices=BACKENDS, default="hf")
    ap.add_argument("--corruption", choices=["none", "noise"], default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder")
    return ap


def _wrap(loaded, backend: str):
    if backend == "transformer_lens":
        from mechrecall.loading import to_transformer_lens

        return to_transformer_lens(loaded)
    if backend == "nnsight":
        from mechrecall.loading import to_nnsight

        return to_nnsight(loaded)
    return loaded.model


def run(args) -> dict:
    from mechrecall.lab.models import lab_dataset
    from mechrecall.loading import load_model

    if args.granularity == "position" and args.corruption == "none":
        raise ValueError("--granularity position needs --corruption noise (formats and facts differ in length)")
    if args.corruption == "noise" and args.backend != "hf":
        raise ValueError("--corruption noise runs on --backend hf only")
    out = Path(args.out)
    result: dict = {"settings": {k: v for k, v in vars(args).items()}, "models": {}}
    frames = []
    for source_name in args.checkpoint:
        loaded = load_model(source_name, registry=args.registry)
        dataset = lab_dataset(loaded)
        pids = dataset.pids(args.facts)[: args.people]
        if args.corruption == "noise":
            examples = (
                dataset.query_examples(pids, templates=[0])
                if args.base_format == "query"
                else dataset.storage_examples(pids)
            )
            base = fact_inputs(loaded.tokenizer, examples[: args.count])
            source, corruption = base, GaussianNoise(3.0, seed=args.seed)
            if args.granularity == "position":  # positions are comparable only across prompts of one length
                readout = base.readout.tolist()
                common = max(set(readout), key=readout.count)
                kept = [ex for ex, r in zip(examples[: args.count], readout) if r == common]
                base = source = fact_inputs(loaded.tokenizer, kept).all_positions()
        else:
            base, source, _ = fact_pairs(
                dataset.factset(pids), loaded.tokenizer, source_format=args.source_format, base_format=args.base_format,
                mode=args.mode, n=args.count, seed=args.seed,
            )  # fmt: skip
            corruption = None
        model = _wrap(loaded, args.backend)
        per_site = {}
        for site in args.sites:
            r = activation_patch(model, base, source, site=site, metric=args.metric, backend=args.backend,
                                 corruption=corruption)  # fmt: skip
            per_site[site] = {
                "axes": list(r.axes),
                "labels": {k: v for k, v in r.labels.items() if k != "example"},
                "mean": r.mean().tolist(),
                "base_mean": float(r.base.mean()),
                "source_mean": float(r.source.mean()) if r.source is not None else None,
                "per_example": r.values.tolist(),
            }
            df = r.to_dataframe()
            df.insert(0, "checkpoint", source_name)
            frames.append(df)
        result["models"][source_name] = {"n": len(base), "sites": per_site}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "patching.json", result)
    table = pd.concat(frames, ignore_index=True)
    tmp = out / ".patching.parquet.tmp"
    table.to_parquet(tmp)
    tmp.replace(out / "patching.parquet")
    atomic_write_text(out / "patching.html", _html(result))
    return result


def _html(result: dict) -> str:
    import plotly.graph_objects as go

    from mechrecall.report.plotting import page as html

    figs = []
    metric = result["settings"]["metric"]
    for name, m in result["models"].items():
        for site, s in m["sites"].items():
            by_head = s["axes"][1] == "head"
            z = [row for layer in s["mean"] for row in layer] if by_head else s["mean"]
            fig = go.Figure(go.Heatmap(z=z, x=s["labels"]["pos"], colorscale="Viridis"))
            fig.update_layout(title=f"{name} · {site} · mean {metric} after patching (base {s['base_mean']:.3f})",
                              xaxis_title="position", yaxis_title="layer x head" if by_head else "layer")  # fmt: skip
            figs.append(fig)
    return html(figs, "mechrecall.patching")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from mechrecall.checkpoint import CheckpointError
    from mechrecall.registry import RegistryError
    from mechrecall.tokenization import RoleAlignmentError

    try:
        result = run(args)
    except (CheckpointError, RegistryError, RoleAlignmentError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, m in result["models"].items():
        for site, s in m["sites"].items():
            mean = torch.tensor(s["mean"])
            print(f"{name} {site}: {args.metric} base {s['base_mean']:.3f}, best patch {float(mean.max()):.3f}, "
                  f"worst {float(mean.min()):.3f} ({m['n']} examples)")  # fmt: skip
    print(f"wrote {Path(args.out) / 'patching.json'}, patching.parquet, patching.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
