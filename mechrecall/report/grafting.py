"""Grafting: does any static mask of the mixed model's parameters carry held-out recall into another model?

The paper reports that grafting the mixed model's shared-update parameters into the two-stage model, both fine-tuned
from one pretrained base, transfers recall. On the lab's from-scratch pairs (default and micro presets, seed 0)
mechrecall's masks analysis found that it transfers nothing, which is not a test of that claim: models trained from
scratch share no coordinates. This module runs every protocol variant the paper's description allows on one lab
checkpoint family (base, stage-1 = biographies only, final two-stage, mixed), so that the answer does not hang on
one choice; the shared-base test is a family fine-tuned from one pretrained base:

- **recipients**: the final two-stage model and the stage-1 (biography-only) model, which has stored every fact
  and never seen a question (and, on request, the base model, as in Panigrahi et al. 2023);
- **masks** of the donor (the mixed model), each at every size in ``ks`` (fractions of the ranked parameters;
  by default 0.01 % to 20 %, then 50 % and 100 % as the ceiling):

  - ``trace:abs_grad``: the shared set, top ``k`` of the storage-format and of the query-format mean |gradient| of the
    donor's training trace, intersected (what the masks analysis grafts);
  - ``trace:grad_x_update``: the same with the trace's |gradient| x |update| importance;
  - ``update``: the top ``k`` of the update size ``|theta_mixed - theta_base|`` (one mask: no format split);
  - ``update:all``: the same over every parameter, embeddings, norms and unembedding included (at ``k = 1`` the
    graft *is* the donor: a model trained from scratch keeps its own residual basis in its embeddings, which a
    block-matrix graft leaves behind);

- **controls** for every mask: size-matched random masks (the same count in every matrix; ``draws`` seeds) and, for
  the trace masks, the format-only sets (storage minus query, query minus storage: larger than the shared set at the
  same ``k``, their counts recorded).

Each graft is ``theta = mask * theta_mixed + (1 - mask) * theta_recipient`` over the ranked parameters; the
recipient's held-out and trained QA (greedy exact match) are measured before and after. A variant **transfers** when
its held-out QA after the graft exceeds the random controls' mean by more than ``max(5 points, 2 sd)`` (sd of the
draws, ddof 1); with dozens of variants per recipient this is a screen, not a test: ``any_transfer`` is the OR of
all of them (post hoc). ``transfer_fraction`` is ``(after - before) / (donor - before)``. ``best`` is each
recipient's variant with the largest gain on the *validation* people, whose held-out QA is then reported: nothing
is chosen on the held-out people.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mechrecall.checkpoint import CheckpointError
from mechrecall.interventions import graft, recall_under, state_of, with_random_controls
from mechrecall.io import atomic_write_files, finite
from mechrecall.lab.models import lab_dataset
from mechrecall.lab.trace import GradientTrace
from mechrecall.loading import load_model
from mechrecall.masks import mask_count, mask_minus, topk_mask, update_importance
from mechrecall.report.analysis import NOT_A_SHARED_BASE_TEST, Analysis, from_scratch

__all__ = ["DEFAULT_KS", "MASK_SOURCES", "run", "summary_rows", "transfers"]

# 0.01 % to 20 %, half, then every ranked parameter (the ceiling of any static graft of block matrices: the recipient keeps
# its own embeddings and norms)
DEFAULT_KS = (0.0001, 0.001, 0.01, 0.05, 0.2, 0.5, 1.0)
MASK_SOURCES = ("trace:abs_grad", "trace:grad_x_update", "update", "update:all")
SPLITS = ("heldout", "validation", "train")
MARGIN = 0.05  # 5 points of exact match: smaller differences are within what a random graft moves on the lab sets


def transfers(after: float, random_mean: float, random_std: float, margin: float = MARGIN) -> bool:
    """Whether a graft's held-out QA beats its size-matched random controls by more than ``max(margin, 2 sd)``."""
    return after - random_mean > max(margin, 2 * random_std)


def _masks(source: str, k: float, trace: GradientTrace | None, update: Mapping, scope: str) -> dict[str, dict]:
    """The mask of ``source`` at size ``k`` and its format-only controls (trace sources only)."""
    if source == "update":
        return {"mask": topk_mask(update, k, scope=scope)}
    if source == "update:all":  # every parameter: embeddings, norms and unembedding too
        return {"mask": topk_mask(update, k, scope=scope, include=lambda n: True)}
    kind = source.split(":", 1)[1]
    storage = topk_mask(trace.importance("storage", kind), k, scope=scope)
    query = topk_mask(trace.importance("query", kind), k, scope=scope)
    shared = {n: storage[n] & query[n] for n in storage}
    return {"mask": shared, "storage_only": mask_minus(storage, query), "query_only": mask_minus(query, storage)}


def _check(sources: Sequence[str], recipients: Mapping[str, str], ks: Sequence[float]) -> None:
    bad = [s for s in sources if s not in MASK_SOURCES]
    if bad:
        raise ValueError(f"mask source {bad[0]!r}: expected one of {', '.join(MASK_SOURCES)}")
    if not recipients:
        raise ValueError("no recipient checkpoints given")
    if not ks or not all(0 < k <= 1 for k in ks):
        raise ValueError(f"mask sizes {list(ks)}: give fractions in (0, 1]")


def _donor_trace(donor, mixed: str, sources: Sequence[str]) -> GradientTrace | None:
    """The donor's training trace, when a trace source asks for it (a run trained with trace=false grafts its
    update masks only)."""
    if not any(s.startswith("trace:") for s in sources):
        return None
    try:
        trace = GradientTrace.load(donor.location)
    except FileNotFoundError:
        raise CheckpointError(
            f"{mixed!r} has no training trace (trained with trace=false): use --sources update update:all"
        ) from None
    if not {"storage", "query"} <= set(trace.formats):
        raise CheckpointError(
            f"{mixed!r} has no two-format training trace (it has {trace.formats}): use --sources update"
        )
    return trace


def _recipient_rows(loaded, facts, donor_sd, masks: dict, totals: dict, donor_recall: dict, draws: int, seed: int):
    """One recipient: its recall before, and one row per (mask source, size) with its random and format-only
    controls."""
    model, tok = loaded.model, loaded.tokenizer
    target = state_of(model)
    before = recall_under(model, tok, facts, target, SPLITS)
    rows = []
    for (src, k), ms in masks.items():
        gr = with_random_controls(model, tok, facts, ms["mask"], lambda m, t=target: graft(t, donor_sd, m),
                                  draws=draws, seed=seed + 100, splits=SPLITS)  # fmt: skip
        row = {
            "source": src, "k": k, "n": gr["n"], "fraction": gr["n"] / totals[src],
            "heldout_after": gr["mask"]["heldout"], "trained_after": gr["mask"]["train"],
            "random_heldout_mean": gr["random_mean"]["heldout"],
            "random_heldout_std": _sd(gr["random"]["heldout"]), "random_trained_mean": gr["random_mean"]["train"],
            "validation_after": gr["mask"]["validation"], "random_validation_mean": gr["random_mean"]["validation"],
        }  # fmt: skip
        for name in ("storage_only", "query_only"):
            if name in ms:
                r = recall_under(model, tok, facts, graft(target, donor_sd, ms[name]), SPLITS)
                row[f"{name}_heldout"], row[f"{name}_n"] = r["heldout"], mask_count(ms[name])
        gap = donor_recall["heldout"] - before["heldout"]
        row["transfer_fraction"] = (row["heldout_after"] - before["heldout"]) / gap if gap > 0 else float("nan")
        row["transfers"] = transfers(row["heldout_after"], row["random_heldout_mean"], row["random_heldout_std"])
        rows.append(row)
    return before, rows


def run(
    mixed: str,
    recipients: Mapping[str, str],
    out: str | Path,
    *,
    base: str,
    registry=None,
    ks: Sequence[float] = DEFAULT_KS,
    sources: Sequence[str] = MASK_SOURCES,
    draws: int = 3,
    seed: int = 0,
    scope: str = "per_matrix",
    device=None,
    dtype=None,
) -> dict:
    """Graft masks of ``mixed`` into each of ``recipients`` (label -> checkpoint) at every size; writes
    ``OUT/grafting.json`` and ``grafting.html``. ``base`` is the checkpoint the family started from (the update
    masks' reference); ``"base"`` as a recipient source means that checkpoint."""
    _check(sources, recipients, ks)
    donor = load_model(mixed, registry=registry, device=device, dtype=dtype, supported_only=True)
    trace = _donor_trace(donor, mixed, sources)
    dataset = lab_dataset(donor)
    facts = dataset.factset()
    base_loaded = load_model(base, registry=registry, device=device, dtype=dtype)
    donor_sd, base_sd = state_of(donor.model), state_of(base_loaded.model)
    # the trace and update sources rank the block matrices (attention and MLP weights), as the masks analysis does;
    # update:all ranks every parameter
    update = update_importance(base_sd, donor_sd)
    donor_recall = recall_under(donor.model, donor.tokenizer, facts, donor_sd, SPLITS)
    masks = {(s, k): _masks(s, k, trace, update, scope) for s in sources for k in ks}
    # each source's ranked parameters (the fractions below are of these)
    totals = {s: sum(m.numel() for m in masks[s, ks[0]]["mask"].values()) for s in sources}
    result: dict = {
        "donor": mixed, "base": base, "ks": list(ks), "sources": list(sources), "scope": scope, "draws": draws,
        "margin": MARGIN, "dataset_hash": dataset.hash, "donor_recall": donor_recall, "recipients": {},
        "ranked_parameters": totals,
        "from_scratch": from_scratch(donor.meta),  # (the caption then says what it cannot test)
    }  # fmt: skip
    for label, source in recipients.items():
        loaded = base_loaded if source == "base" else load_model(source, registry=registry, device=device,
                                                                   dtype=dtype, supported_only=True)  # fmt: skip
        if loaded.meta.get("dataset_hash", dataset.hash) != dataset.hash:
            raise CheckpointError(f"{source!r} and {mixed!r} were trained on different datasets")
        before, rows = _recipient_rows(loaded, facts, donor_sd, masks, totals, donor_recall, draws, seed)
        result["recipients"][label] = {"source": source, "before": before, "rows": rows}
    result["any_transfer"] = any(r["transfers"] for e in result["recipients"].values() for r in e["rows"])
    result["best"] = _best(result)
    page = figure(result).to_html(include_plotlyjs=True)
    atomic_write_files(Path(out), {"grafting.json": finite(result), "grafting.html": page})
    return result


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _best(result: dict) -> dict:
    """Per recipient, the variant with the largest *validation* gain over its random controls (chosen on the
    validation people; its held-out QA is then reported)."""
    best = {}
    for label, e in result["recipients"].items():
        r = max(e["rows"], key=lambda r: r["validation_after"] - r["random_validation_mean"])
        best[label] = {k: r[k] for k in ("source", "k", "fraction", "validation_after", "random_validation_mean",
                                          "heldout_after", "random_heldout_mean", "transfer_fraction",
                                          "transfers")}  # fmt: skip
        best[label]["before"] = e["before"]["heldout"]
    return best


def figure(result: dict):
    """Held-out QA after grafting against the grafted fraction: one panel per recipient, a line per mask source, its
    random controls dashed, the donor's and the recipient's own recall as horizontal lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = list(result["recipients"])
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[f"into {lab}" for lab in labels])
    for j, lab in enumerate(labels, 1):
        e = result["recipients"][lab]
        for src in result["sources"]:
            rows = sorted((r for r in e["rows"] if r["source"] == src), key=lambda r: r["k"])
            x = [max(r["fraction"], 1e-7) for r in rows]
            fig.add_trace(go.Scatter(x=x, y=[r["heldout_after"] for r in rows], mode="lines+markers", name=src,
                                     legendgroup=src, showlegend=j == 1), row=1, col=j)  # fmt: skip
            fig.add_trace(go.Scatter(x=x, y=[r["random_heldout_mean"] for r in rows], mode="lines",
                                     line={"dash": "dash"}, name=f"{src} random", legendgroup=src,
                                     showlegend=j == 1), row=1, col=j)  # fmt: skip
        for y, name in ((result["donor_recall"]["heldout"], "donor (mixed)"), (e["before"]["heldout"], "before")):
            fig.add_hline(y=y, line={"dash": "dot"}, annotation_text=name, row=1, col=j)
        fig.update_xaxes(type="log", title_text="grafted fraction of ranked parameters", row=1, col=j)
    fig.update_yaxes(title_text="held-out QA after grafting", col=1)
    fig.update_layout(title="Grafting the mixed model's parameters: every protocol variant", height=420)
    return fig


def summary_rows(result: dict) -> list[str]:
    lines = [f"donor held-out QA {result['donor_recall']['heldout']:.3f}; any variant transfers: "
             f"{result['any_transfer']}"]  # fmt: skip
    for lab, e in result["recipients"].items():
        lines.append(f"into {lab} (held-out before {e['before']['heldout']:.3f}):")
        for r in e["rows"]:
            lines.append(f"  {r['source']:20s} k={r['k']:<7g} frac={r['fraction']:.5f} held-out "
                         f"{r['heldout_after']:.3f} vs random {r['random_heldout_mean']:.3f}"
                         f"{' TRANSFERS' if r['transfers'] else ''}")  # fmt: skip
    return lines


def captioned(grafting: dict) -> list[tuple]:
    """Every grafting variant for the page (written beside a run by ``analyses/grafting.py``)."""
    best = "; ".join(
        f"into {lab}: best on validation people {b['source']} at {b['fraction']:.4%} of the ranked weights, "
        f"held-out {b['before']:.3f} -> {b['heldout_after']:.3f} (random {b['random_heldout_mean']:.3f})"
        for lab, b in grafting["best"].items()
    )
    caption = (f"Grafting, every protocol variant (analyses/grafting.py): masks of the mixed model's trace and update "
               f"size at {len(grafting['ks'])} sizes, into each recipient, against size-matched random masks. {best}. "
               f"Any variant beats its random controls by more than max(5 points, 2 sd) (a post-hoc screen over every "
               f"variant): {grafting['any_transfer']}.")  # fmt: skip
    if grafting.get("from_scratch"):
        caption += " " + NOT_A_SHARED_BASE_TEST
    return [(figure(grafting), caption)]


ANALYSIS = Analysis(name="grafting", output="grafting.json", order=50, captioned=captioned, beside=True)
