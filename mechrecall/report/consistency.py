"""Run :func:`mechrecall.consistency.measure` on several checkpoints and write JSON + plotly figures.

The lab default measures each lab checkpoint on the held-out people of the dataset it was trained on; with
``facts=`` (a fact file, ``datasets.Dataset`` or :class:`~mechrecall.facts.FactSet`) any checkpoints (registry name,
folder, Hugging Face id, GGUF) are measured on those facts instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mechrecall.consistency import measure
from mechrecall.devices import model_device, model_dtype
from mechrecall.facts import select_facts
from mechrecall.io import atomic_write_files, atomic_write_json, atomic_write_text
from mechrecall.lab.models import lab_dataset
from mechrecall.loading import load_each, load_model, to_nnsight, to_transformer_lens, unique_labels
from mechrecall.report.analysis import Analysis, PairContext, check_labels, labels_of, versus
from mechrecall.tokenization import check_tokenization


def run(
    checkpoints: Sequence[str],
    out: str | Path,
    *,
    registry: str | Path | None = None,
    n_people: int = 200,
    grad_facts: int = 240,
    grad_batch: int | None = None,
    grad_sketch: int | None = None,
    labels: Sequence[str] | None = None,
    facts=None,
    split: str | None = None,
    device=None,
    dtype=None,
    parity: bool = True,
) -> dict:
    """Consistency of each checkpoint; the lab's held-out people by default, or ``facts`` (a fact file, dataset or
    :class:`FactSet`: its ``split``, first ``n_people`` facts) on any checkpoint, on ``device`` in ``dtype``."""
    out = Path(out)
    labels = check_labels(labels, len(checkpoints))
    fs = select_facts(facts, split, n_people) if facts is not None else None
    loads = load_each(checkpoints, registry=registry, device=device, dtype=dtype)  # a checkpoint twice: measured once
    if labels is None:
        names = [lm.meta.get("regime", src) if fs is None else src for lm, src in zip(loads, checkpoints)]
        labels = unique_labels(names)
    models, done = {}, {}
    for label, source, loaded in zip(labels, checkpoints, loads):
        if id(loaded) not in done:
            if fs is None:
                dataset = lab_dataset(loaded)
                these = dataset.factset(dataset.pids("heldout")[:n_people])
            else:
                these = check_tokenization(fs, loaded.tokenizer, ("subject", "relation", "final"), source)
            done[id(loaded)] = _measure_one(loaded, these, grad_facts, grad_batch, grad_sketch, parity)
        models[label] = {**done[id(loaded)], "source": source}
    if fs is None:
        result = {"people": "heldout", "n_people": n_people}
    else:
        result = {"facts": fs.source, "split": split, "n_facts": len(fs), "device": str(model_device(loads[0].model)),
                  "dtype": str(model_dtype(loads[0].model)).removeprefix("torch.")}  # fmt: skip
    result["labels"] = list(models)  # reference first
    result |= {
        "backend_parity": {k: v["backend_parity_max_abs_logit_diff"] for k, v in models.items()},
        "gradient": {k: {"source": v["source"], **v["gradient"]} for k, v in models.items()},
        "representation": {k: {"source": v["source"], **v["representation"]} for k, v in models.items()},
    }
    atomic_write_files(out, {"consistency.json": result, "consistency.html": figures_html(result)})
    return result


def _measure_one(loaded, facts, grad_facts, grad_batch, grad_sketch, parity: bool) -> dict:
    """One model's consistency (:func:`mechrecall.consistency.measure`) and, with ``parity``, how far the
    TransformerLens and nnsight wrappings' logits are from the model's own."""
    parity_diff = (
        {"transformer_lens": to_transformer_lens(loaded).cfg.parity_max_abs_diff,
         "nnsight": to_nnsight(loaded).parity_max_abs_diff}
        if parity
        else {}
    )  # fmt: skip
    measured = measure(loaded.model, loaded.tokenizer, facts, grad_facts=grad_facts, grad_batch=grad_batch,
                       sketch_dim=grad_sketch)  # fmt: skip
    return {"backend_parity_max_abs_logit_diff": parity_diff, **measured}


def figures(result: dict) -> list:
    import plotly.graph_objects as go

    rep = go.Figure()
    for name, r in result["representation"].items():
        per_layer = r["per_layer"]
        base = r["baseline_per_layer"]
        for role in per_layer:
            margin = [a - b for a, b in zip(per_layer[role], base[role])]
            rep.add_trace(
                go.Scatter(x=list(range(len(margin))), y=margin, mode="lines+markers", name=f"{name} · {role}")
            )
    rep.update_layout(
        title="Representation consistency: cos(storage, query) of the same fact minus mismatched facts (resid_post)",
        xaxis_title="layer",
        yaxis_title="cosine margin",
    )
    grad = go.Figure()
    for name, g in result["gradient"].items():
        groups = {k: v for k, v in g["groups"].items() if k.startswith("layer:")}
        grad.add_trace(
            go.Bar(
                x=["all", *[k.removeprefix("layer:") for k in groups]],
                y=[g["same_fact_mean_cos"], *[v["mean_cos"] for v in groups.values()]],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [
                        g["ci"][1] - g["same_fact_mean_cos"],
                        *[v["ci"][1] - v["mean_cos"] for v in groups.values()],
                    ],
                    "arrayminus": [
                        g["same_fact_mean_cos"] - g["ci"][0],
                        *[v["mean_cos"] - v["ci"][0] for v in groups.values()],
                    ],
                },
                name=name,
            )
        )
    grad.update_layout(
        title="Gradient consistency: cos(∇ storage-format answer loss, ∇ query-format answer loss), "
        + ("held-out facts" if "facts" not in result else f"facts of {Path(result['facts']).name}"),
        yaxis_title="cosine (95% bootstrap CI)",
        barmode="group",
    )
    return [grad, rep]


def figures_html(result: dict) -> str:
    from mechrecall.plotting import page

    return page(figures(result), "mechrecall consistency")


def trajectory(run_dir: str | Path, out: str | Path, *, n_people: int = 50, grad_facts: int = 60) -> dict:
    """Consistency measured on every checkpoint saved during training (both regimes of one run folder).

    Points: ``<regime>/checkpoints/step-*`` and ``final`` (ordered by global step). Held-out people only; fewer
    facts than the end-point analysis, since it runs once per checkpoint.
    """
    import json

    import plotly.graph_objects as go

    from mechrecall.checkpoint import read_meta

    run_dir, out = Path(run_dir), Path(out)
    curves: dict[str, list[dict]] = {}
    for regime in ("two_stage", "mixed"):
        points = sorted(
            [*run_dir.glob(f"{regime}/checkpoints/step-*"), run_dir / regime / "final"],
            key=lambda p: read_meta(p)["global_step"],
        )
        for folder in points:
            loaded = load_model(str(folder))
            dataset = lab_dataset(loaded)
            m = measure(loaded.model, loaded.tokenizer, dataset.factset(dataset.pids("heldout")[:n_people]),
                        grad_facts=grad_facts)  # fmt: skip
            meta = read_meta(folder)
            curves.setdefault(regime, []).append(
                {
                    "global_step": meta["global_step"],
                    "stage": meta["stage"],
                    "gradient_cos": m["gradient"]["same_fact_mean_cos"],
                    "gradient_ci": m["gradient"]["ci"],
                    "final_margin": m["representation"]["final_last_layer_margin"],
                    "subject_margin": m["representation"]["subject_last_layer_margin"],
                }
            )
    result = {"run": str(run_dir), "n_people": n_people, "grad_facts": grad_facts, "curves": curves}
    atomic_write_json(out / "consistency_trajectory.json", result)
    fig = go.Figure()
    for regime, pts in curves.items():
        x = [p["global_step"] for p in pts]
        fig.add_trace(
            go.Scatter(x=x, y=[p["gradient_cos"] for p in pts], mode="lines+markers", name=f"{regime} · gradient cos")
        )
        fig.add_trace(
            go.Scatter(
                x=x, y=[p["final_margin"] for p in pts], mode="lines+markers", name=f"{regime} · final-token margin"
            )
        )
    fig.update_layout(
        title="Consistency over training (held-out facts)", xaxis_title="global step", yaxis_title="cosine"
    )
    atomic_write_text(out / "consistency_trajectory.html", fig.to_html(include_plotlyjs=True))
    json.dumps(result)  # fail early on non-JSON values
    return result


def captioned(result: dict) -> list[tuple]:
    """Findings 1 and 2 for the page: each figure with a caption comparing the pair (reference first)."""
    first, second = labels_of(result)
    g, r = result["gradient"], result["representation"]
    grad, rep = figures(result)
    grad_caption = (
        f"Finding 1, gradient consistency: cosine between the gradients of the storage-format and the query-format "
        f"answer loss of the same fact, overall and per block (95% bootstrap CIs). {second} "
        f"{g[second]['same_fact_mean_cos']:.3f} vs {first} {g[first]['same_fact_mean_cos']:.3f}; mismatched facts "
        f"give ~{g[second]['baseline_mean_cos']:.3f}. "
        + versus(g[second]["same_fact_mean_cos"], g[first]["same_fact_mean_cos"],
                 "mixed training aligns the two formats' gradients", intervals=(g[second]["ci"], g[first]["ci"]))
    )  # fmt: skip
    rep_caption = (
        f"Finding 2, representation consistency: cosine of the same fact's hidden states in both formats minus that "
        f"of mismatched facts, per layer and token role. Last-layer subject margin {second} "
        f"{r[second]['subject_last_layer_margin']:.3f} vs {first} {r[first]['subject_last_layer_margin']:.3f}; "
        f"final-token margin {r[second]['final_last_layer_margin']:.3f} vs {r[first]['final_last_layer_margin']:.3f}. "
        + versus(r[second]["final_last_layer_margin"], r[first]["final_last_layer_margin"],
                 "mixed training makes a fact's representations in the two formats more alike")
    )  # fmt: skip
    return [(grad, grad_caption), (rep, rep_caption)]


def run_pair(first: str, second: str, out, *, registry=None, labels=None, context: PairContext = PairContext()):
    return run([first, second], out, registry=registry, labels=labels, **ANALYSIS.sizes(context))


ANALYSIS = Analysis(
    name="consistency",
    output="consistency.json",
    order=10,
    captioned=captioned,
    run_pair=run_pair,
    pretrained_sizes={"n_people": 40, "grad_facts": 48},
)
