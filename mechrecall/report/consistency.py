"""Run :func:`mechrecall.consistency.measure` on several checkpoints and write JSON + plotly figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mechrecall.consistency import measure
from mechrecall.io import atomic_write_json, atomic_write_text
from mechrecall.lab.models import lab_dataset
from mechrecall.loading import load_model, to_nnsight, to_transformer_lens


def run(
    checkpoints: Sequence[str],
    out: str | Path,
    *,
    registry: str | Path | None = None,
    n_people: int = 200,
    grad_facts: int = 240,
    labels: Sequence[str] | None = None,
) -> dict:
    out = Path(out)
    models = {}
    for i, source in enumerate(checkpoints):
        loaded = load_model(source, registry=registry)
        dataset = lab_dataset(loaded)
        pids = dataset.pids("heldout")[:n_people]
        label = labels[i] if labels else loaded.meta.get("regime", source)
        parity = {
            "transformer_lens": to_transformer_lens(loaded).cfg.parity_max_abs_diff,
            "nnsight": to_nnsight(loaded).parity_max_abs_diff,
        }
        models[label] = {
            "source": source,
            "backend_parity_max_abs_logit_diff": parity,
            **measure(loaded.model, loaded.tokenizer, dataset.factset(pids), grad_facts=grad_facts),
        }
    result = {
        "people": "heldout",
        "n_people": n_people,
        "backend_parity": {k: v["backend_parity_max_abs_logit_diff"] for k, v in models.items()},
        "gradient": {k: {"source": v["source"], **v["gradient"]} for k, v in models.items()},
        "representation": {k: {"source": v["source"], **v["representation"]} for k, v in models.items()},
    }
    atomic_write_json(out / "consistency.json", result)
    atomic_write_text(out / "consistency.html", figures_html(result))
    return result


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
                y=[g["heldout_mean_cos"], *[v["mean_cos"] for v in groups.values()]],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [
                        g["ci"][1] - g["heldout_mean_cos"],
                        *[v["ci"][1] - v["mean_cos"] for v in groups.values()],
                    ],
                    "arrayminus": [
                        g["heldout_mean_cos"] - g["ci"][0],
                        *[v["mean_cos"] - v["ci"][0] for v in groups.values()],
                    ],
                },
                name=name,
            )
        )
    grad.update_layout(
        title="Gradient consistency: cos(∇ storage-format answer loss, ∇ query-format answer loss), held-out facts",
        yaxis_title="cosine (95% bootstrap CI)",
        barmode="group",
    )
    return [grad, rep]


def figures_html(result: dict) -> str:
    from mechrecall.report.plotting import page

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
                    "gradient_cos": m["gradient"]["heldout_mean_cos"],
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
