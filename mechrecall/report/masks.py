"""Shared-update masks of a two-stage / mixed checkpoint pair: statistics, ablation, grafting, JSON + figures.

Importance comes from each checkpoint's training trace (``trace.safetensors``, :mod:`mechrecall.lab.trace`): the
storage mask is the top ``k`` of storage-format importance, the query mask the top ``k`` of query-format importance,
the shared mask their intersection. Ablation resets a mask to the base (pre-fine-tuning) weights of the same model;
grafting copies a regime's shared parameters into the other regime's model (both start from the same base). Every
intervention is compared with size-matched random masks (same count in every matrix, several draws) and with the
format-only masks (storage minus query, query minus storage). Recall is greedy exact-match QA on the held-out people
(measurement only: nothing here is tuned on it) and on the trained people.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mechrecall.checkpoint import CheckpointError
from mechrecall.interventions import ablate, graft, recall_under, state_of, with_random_controls
from mechrecall.io import atomic_write_json, atomic_write_text
from mechrecall.lab.models import lab_dataset
from mechrecall.lab.trace import GradientTrace
from mechrecall.loading import LoadedModel, load_model
from mechrecall.masks import MaskComparison, localize, mask_count, mask_minus, masked_cosines, random_overlap, topk_mask

SPLITS = ("heldout", "train")
POINTS = 100.0  # drops are reported in percentage points of exact-match recall


def base_source(loaded: LoadedModel, registry=None) -> str:
    """The base checkpoint of a lab checkpoint: its registry entry's ``base_model``, else ``<run>/data/base``."""
    from mechrecall.registry import RegistryError, resolve

    try:
        _, entry = resolve(loaded.source, registry)
        if entry is not None and entry.base_model:
            return entry.base_model
    except RegistryError:
        pass
    guess = Path(loaded.location).parents[1] / "data" / "base"
    if guess.is_dir():
        return str(guess)
    raise CheckpointError(f"cannot tell the base checkpoint of {loaded.source!r}: pass base= explicitly")


def comparison(trace: GradientTrace, k: float, *, kind: str = "abs_grad", scope: str = "per_matrix") -> MaskComparison:
    return MaskComparison(
        topk_mask(trace.importance("storage", kind), k, scope=scope),
        topk_mask(trace.importance("query", kind), k, scope=scope),
        k,
    )


def _drop(before: dict, after: dict) -> dict:
    return {s: POINTS * (before[s] - after[s]) for s in before}


def _consistency_split(loaded: LoadedModel, dataset, shared, n_facts: int) -> dict:
    """Gradient cosine of the same held-out fact's two formats inside the shared set and outside it."""
    from mechrecall.gradients import answer_batch, per_example_grads

    pids = dataset.pids("heldout")
    storage = dataset.storage_examples(pids)[:n_facts]
    query = dataset.query_examples(pids, templates=[0])[:n_facts]
    model = loaded.model
    params = {n: p.detach() for n, p in model.named_parameters() if n in shared}
    gs = per_example_grads(model, answer_batch(loaded.tokenizer, storage), params)
    gq = per_example_grads(model, answer_batch(loaded.tokenizer, query), params)
    cos = masked_cosines(gs, gq, shared)
    return {w: {"mean_cos": float(c.mean()), "per_fact": c.tolist()} for w, c in cos.items()}


def run(
    two_stage: str,
    mixed: str,
    out: str | Path,
    *,
    base: str | None = None,
    registry: str | Path | None = None,
    k: float = 0.05,
    ks: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    draws: int = 5,
    sweep_draws: int = 2,
    kind: str = "abs_grad",
    scope: str = "per_matrix",
    consistency_facts: int = 64,
    seed: int = 0,
) -> dict:
    out = Path(out)
    models = {"two_stage": load_model(two_stage, registry=registry), "mixed": load_model(mixed, registry=registry)}
    dataset = lab_dataset(models["mixed"])
    facts = dataset.factset()
    if models["two_stage"].meta.get("dataset_hash") != dataset.hash:
        raise CheckpointError(f"{two_stage!r} and {mixed!r} were trained on different datasets")
    base_loaded = load_model(base or base_source(models["mixed"], registry), registry=registry)
    base_sd = state_of(base_loaded.model)
    traces = {r: GradientTrace.load(m.location) for r, m in models.items()}
    states = {r: state_of(m.model) for r, m in models.items()}
    config = models["mixed"].model.config
    other = {"two_stage": "mixed", "mixed": "two_stage"}

    result: dict = {"k": k, "importance": f"trace:{kind}", "scope": scope, "units": "held-out QA percentage points"}
    result["dataset_hash"] = dataset.hash
    for regime, loaded in models.items():
        model, tok = loaded.model, loaded.tokenizer
        comp = comparison(traces[regime], k, kind=kind, scope=scope)
        shared = comp.shared
        entry = comp.stats(config)
        loc = localize(shared, config)
        entry["heads_fraction"] = (loc["heads"] / loc["heads_total"]).tolist()
        # recall of the model itself, then with its shared set reset to base, and the controls
        intact = recall_under(model, tok, facts, states[regime], SPLITS)
        abl = with_random_controls(
            model, tok, facts, shared, lambda m, r=regime: ablate(states[r], m, "base", base_sd),
            draws=draws, seed=seed, splits=SPLITS,
        )  # fmt: skip
        only = {
            "storage_only": mask_minus(comp.storage, comp.query),
            "query_only": mask_minus(comp.query, comp.storage),
        }
        fmt_only = {
            name: recall_under(model, tok, facts, ablate(states[regime], m, "base", base_sd), SPLITS)
            for name, m in only.items()
        }
        entry["recall"] = intact
        entry["ablation"] = {
            "mode": "base",
            "shared_drop": _drop(intact, abl["mask"])["heldout"],
            "random_drop_mean": POINTS * (intact["heldout"] - abl["random_mean"]["heldout"]),
            "random_drop_std": POINTS * abl["random_std"]["heldout"],
            "random_drops": [POINTS * (intact["heldout"] - v) for v in abl["random"]["heldout"]],
            "trained_shared_drop": _drop(intact, abl["mask"])["train"],
            "trained_random_drop_mean": POINTS * (intact["train"] - abl["random_mean"]["train"]),
            "format_only_drops": {name: _drop(intact, r) for name, r in fmt_only.items()},
            "format_only_counts": {name: mask_count(m) for name, m in only.items()},
            "n_masked": abl["n"],
        }
        # grafting: the other regime's model receives this regime's shared parameters
        recipient = other[regime]
        rmodel = models[recipient].model
        before = recall_under(rmodel, tok, facts, states[recipient], SPLITS)
        gr = with_random_controls(
            rmodel, tok, facts, shared, lambda m, r=regime, t=recipient: graft(states[t], states[r], m),
            draws=draws, seed=seed + 100, splits=SPLITS,
        )  # fmt: skip
        entry["grafting"] = {
            "recipient": recipient,
            "heldout_before": before["heldout"],
            "heldout_after": gr["mask"]["heldout"],
            "random_heldout_mean": gr["random_mean"]["heldout"],
            "random_heldout_std": gr["random_std"]["heldout"],
            "random_heldout": gr["random"]["heldout"],
            "trained_before": before["train"],
            "trained_after": gr["mask"]["train"],
            "donor_heldout": intact["heldout"],
        }
        entry["consistency"] = _consistency_split(loaded, dataset, shared, consistency_facts)
        entry["sweep"] = _sweep(models, regime, recipient, traces[regime], states, base_sd, facts, ks, kind, scope,
                                sweep_draws, seed, intact["heldout"])  # fmt: skip
        result[regime] = entry
    atomic_write_json(out / "masks.json", result)
    atomic_write_text(out / "masks.html", figures_html(result, config))
    return result


def _sweep(
    models, regime, recipient, trace, states, base_sd, facts, ks, kind, scope, draws, seed, intact: float
) -> list[dict]:
    """Shared-set size, ablation and grafting over mask sizes ``ks``; ``intact`` = the model's own held-out QA."""
    model, tok = models[regime].model, models[regime].tokenizer
    rows = []
    for kk in ks:
        comp = comparison(trace, kk, kind=kind, scope=scope)
        shared = comp.shared
        abl = with_random_controls(
            model, tok, facts, shared, lambda m: ablate(states[regime], m, "base", base_sd), draws=draws, seed=seed
        )
        gr = with_random_controls(
            models[recipient].model, tok, facts, shared, lambda m: graft(states[recipient], states[regime], m),
            draws=draws, seed=seed + 100,
        )  # fmt: skip
        st = comp.stats()
        rows.append(
            {
                "k": kk,
                "shared_fraction": st["shared_fraction"],
                "jaccard": st["jaccard"],
                "random_shared_fraction": random_overlap(st["storage_fraction"], st["query_fraction"])[
                    "shared_fraction"
                ],
                "ablation_shared_drop": POINTS * (intact - abl["mask"]["heldout"]),
                "ablation_random_drop_mean": POINTS * (intact - abl["random_mean"]["heldout"]),
                "graft_heldout": gr["mask"]["heldout"],
                "graft_random_heldout_mean": gr["random_mean"]["heldout"],
            }
        )
    return rows


def figures(result: dict, config=None) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    regimes = [r for r in ("two_stage", "mixed") if r in result]
    size = go.Figure()
    for r in regimes:
        sw = result[r]["sweep"]
        size.add_trace(go.Scatter(x=[s["k"] for s in sw], y=[s["shared_fraction"] for s in sw], name=f"{r} shared"))
    sw = result[regimes[0]]["sweep"]
    size.add_trace(
        go.Scatter(x=[s["k"] for s in sw], y=[s["random_shared_fraction"] for s in sw], name="random expectation",
                   line={"dash": "dash"})
    )  # fmt: skip
    size.update_layout(title="Shared-update set size vs k", xaxis_title="k (top fraction per format)",
                       yaxis_title="shared fraction of block parameters", xaxis_type="log", yaxis_type="log")  # fmt: skip

    n_layers = len(result[regimes[0]]["per_layer_fraction"])
    heat = make_subplots(rows=1, cols=len(regimes), subplot_titles=[f"{r}: shared fraction per head" for r in regimes])
    for i, r in enumerate(regimes):
        heat.add_trace(
            go.Heatmap(z=result[r]["heads_fraction"], y=[f"L{L}" for L in range(n_layers)], coloraxis="coloraxis"),
            row=1, col=i + 1,
        )  # fmt: skip
    heat.update_layout(
        title=f"Where the shared set lies (k={result['k']}): attention heads", coloraxis={"colorscale": "Viridis"}
    )

    abl = go.Figure()
    for r in regimes:
        sw = result[r]["sweep"]
        abl.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["ablation_shared_drop"] for s in sw], name=f"{r}: shared")
        )
        abl.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["ablation_random_drop_mean"] for s in sw], name=f"{r}: random",
                       line={"dash": "dash"})
        )  # fmt: skip
    abl.update_layout(title="Ablation (reset to base): held-out QA drop", xaxis_title="k", yaxis_title="drop (points)",
                      xaxis_type="log")  # fmt: skip

    gr = go.Figure()
    for r in regimes:
        sw = result[r]["sweep"]
        rec = result[r]["grafting"]["recipient"]
        gr.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["graft_heldout"] for s in sw], name=f"{r} shared -> {rec}")
        )
        gr.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["graft_random_heldout_mean"] for s in sw],
                       name=f"random -> {rec}", line={"dash": "dash"})
        )  # fmt: skip
    gr.update_layout(
        title="Grafting: recipient's held-out QA", xaxis_title="k", yaxis_title="held-out QA", xaxis_type="log"
    )
    return [size, heat, abl, gr]


def figures_html(result: dict, config=None) -> str:
    from mechrecall.report.plotting import page

    return page(figures(result, config), "mechrecall masks")


def summary_rows(result: dict) -> list[str]:
    """Markdown rows for results.md."""
    lines = ["| regime | shared fraction | random expectation | Jaccard | ablation drop: shared | random (mean ± sd) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in ("two_stage", "mixed"):
        e = result[r]
        a = e["ablation"]
        lines.append(
            f"| {r} | {e['shared_fraction']:.4f} | {e['random_expectation']['shared_fraction']:.4f} | {e['jaccard']:.3f} "
            f"| {a['shared_drop']:.1f} | {a['random_drop_mean']:.1f} ± {a['random_drop_std']:.1f} |"
        )
    g = result["mixed"]["grafting"]
    lines.append("")
    lines.append(
        f"Grafting mixed's shared set into two-stage: held-out QA {g['heldout_before']:.3f} -> {g['heldout_after']:.3f} "
        f"(random masks of the same size: {g['random_heldout_mean']:.3f} ± {g['random_heldout_std']:.3f}; "
        f"mixed itself {g['donor_heldout']:.3f})"
    )
    return lines
