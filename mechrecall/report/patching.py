"""Cross-format activation patching of a checkpoint pair: ``patching.json`` (:mod:`mechrecall.patching.record`).

Patching (held-out people, both regimes): the storage-format prompt of person A is the source, the query-format
prompt of person B (same attribute) the base; after patching a (site, layer, role) the metric is the logit
difference A's value - B's value at the query's answer position, and the *hit rate* is how often the base now
answers A's value. Where the storage-format state of a fact can stand in for the query-format state (format-
invariant retrieval, finding 2/5) the hit rate is high. Also recorded: ROME noise tracing on query prompts (restore
the clean state of one layer x role after noising the subject) and an attribution-patching screen checked against
exact patching.

With ``facts=`` (a fact file, ``datasets.Dataset`` or :class:`~mechrecall.facts.FactSet`) it runs on any two
checkpoints instead (registry names, folders, Hugging Face ids, GGUF; the same one twice is fine): pairs are drawn
within each relation of the facts, results are keyed by checkpoint label (``labels`` in the JSON), and ``sites`` /
``layers`` narrow the sweep (a 30-layer model has 4 x 30 x 3 cells per pair otherwise).
"""

from __future__ import annotations

from pathlib import Path

from mechrecall.devices import model_device, model_dtype
from mechrecall.facts import FactSet, select_facts
from mechrecall.io import atomic_write_files
from mechrecall.lab.models import lab_dataset
from mechrecall.loading import load_each
from mechrecall.patching import GaussianNoise, activation_patch, fact_inputs, fact_pairs
from mechrecall.patching.atp import attribution_patch, check_attribution
from mechrecall.patching.prompts import patch_roles
from mechrecall.patching.record import best_site, metric_mean, model_record, patching_record, site_record
from mechrecall.plotting import page as html
from mechrecall.report.analysis import Analysis, PairContext, labels_of, pair_labels, versus
from mechrecall.tokenization import check_tokenization

__all__ = ["SITES", "patching_one", "run_patching", "patching_figures", "summary_rows", "captioned", "ANALYSIS"]

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def _layers_of(result, layers):
    """``result`` (every layer) cut to ``layers`` (as an exact sweep over those layers labels them)."""
    from dataclasses import replace

    if layers is None:
        return result
    idx = [result.labels["layer"].index(L) for L in layers]
    return replace(result, values=result.values[idx], labels={**result.labels, "layer": list(layers)})


def patching_one(
    model,
    tokenizer,
    facts: FactSet,
    *,
    source: str = "",
    n_pairs: int = 120,
    seed: int = 0,
    sites=SITES,
    layers=None,
    roles=None,
    whole_answer: bool = False,
) -> dict:
    """One model's :func:`~mechrecall.patching.record.model_record`: cross-format patching (storage of A -> query of
    B) on ``facts`` at ``sites`` x ``layers`` (default: every layer) x ``roles`` (default: those every text has), then
    AtP (checked against the ``attn_out`` sweep when it ran) and noise tracing on the facts' query prompts. The
    metrics are ``logit_diff`` and ``hit`` (first answer token), plus ``answer_logprob`` / ``answer_match`` (the whole
    answer) with ``whole_answer``, all from the same forwards."""
    roles = patch_roles(facts) if roles is None else tuple(roles)
    counts = {"asked": n_pairs}
    base, src, rows = fact_pairs(facts, tokenizer, source_format="storage", base_format="query", n=n_pairs, seed=seed,
                                 roles=roles, whole_answer=whole_answer, stats=counts)  # fmt: skip
    metrics = ["logit_diff", "hit", *(("answer_logprob", "answer_match") if whole_answer else ())]
    sweeps = {site: activation_patch(model, base, src, site=site, layers=layers, metric=metrics) for site in sites}
    extra: dict = {}
    if "attn_out" in sweeps:
        atp = attribution_patch(model, base, src, site="attn_out")
        extra["atp_check_attn_out"] = check_attribution(_layers_of(atp, layers), sweeps["attn_out"]["logit_diff"])
    # ROME tracing on the query prompts of the same facts: noise on the subject, restore one clean state
    clean = fact_inputs(tokenizer, facts.examples("query", templates=[0])[:n_pairs], roles=roles)
    trace = activation_patch(model, clean, clean, site="resid_pre", layers=layers, corruption=GaussianNoise(3.0, seed),
                             metric="prob")  # fmt: skip
    extra["noise_tracing_resid_pre"] = {
        "clean_prob": float(trace.source.mean()),
        "corrupted_prob": float(trace.base.mean()),
        "restored_prob": trace.mean().tolist(),
        "layers": trace.labels["layer"],
        "pos": trace.labels["pos"],
    }
    per_site = {site: site_record(r) for site, r in sweeps.items()}
    return model_record(source, rows, roles, per_site, counts, **extra)


def _described(facts: FactSet | None, n_people: int) -> dict:
    if facts is None:
        return {"source": "each run's own people", "split": "heldout", "people": n_people}
    return {"source": facts.source, "n_facts": len(facts), "relations": facts.relations}


def run_patching(
    two_stage: str,
    mixed: str,
    out: str | Path,
    *,
    registry=None,
    n_people: int = 40,
    n_pairs: int = 120,
    facts=None,
    split: str | None = None,
    labels=None,
    sites=SITES,
    layers=None,
    device=None,
    dtype=None,
) -> dict:
    """Patching of a lab pair (held-out people), or of any two checkpoints on ``facts`` (its ``split``, first
    ``n_people`` facts), on ``device`` in ``dtype``; writes ``patching.json`` and ``patching.html``."""
    out = Path(out)
    fs = select_facts(facts, split, n_people) if facts is not None else None
    pair = pair_labels(two_stage, mixed, fs, labels)
    loads = load_each([src for _, src in pair], registry=registry, device=device, dtype=dtype)
    settings = {"source_format": "storage", "base_format": "query", "mode": "cross_fact", "n_pairs": n_pairs,
                "sites": list(sites), "layers": layers, "device": str(model_device(loads[0].model)),
                "dtype": str(model_dtype(loads[0].model)).removeprefix("torch.")}  # fmt: skip
    done: dict = {}  # the same checkpoint twice: measured once (the sweep is deterministic)
    models = {}
    for (label, src), lm in zip(pair, loads):
        if id(lm) not in done:
            if fs is None:
                ds = lab_dataset(lm)
                these = ds.factset(ds.pids("heldout")[:n_people])
            else:
                these = check_tokenization(fs, lm.tokenizer, patch_roles(fs), src)
            done[id(lm)] = patching_one(lm.model, lm.tokenizer, these, n_pairs=n_pairs, sites=sites, layers=layers,
                                        whole_answer=fs is not None)  # fmt: skip
        models[label] = {**done[id(lm)], "source": src}
    result = patching_record(settings, models, _described(fs, n_people))
    atomic_write_files(
        out, {"patching.json": result, "patching.html": html(patching_figures(result), "mechrecall patching")}
    )
    return result


def patching_figures(result: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    regimes = labels_of(result)
    figs = []
    fig = make_subplots(rows=1, cols=len(regimes),
                        subplot_titles=[f"{r}: hit rate, storage(A) -> query(B)" for r in regimes])  # fmt: skip
    for i, r in enumerate(regimes):
        s = result["models"][r]["sites"]
        first = s[next(iter(s))]["labels"]
        z = [
            [s[site]["metrics"]["hit"]["mean"][L][j] for site in s for j in range(len(first["pos"]))]
            for L in range(len(first["layer"]))
        ]
        x = [f"{site}·{pos}" for site in s for pos in first["pos"]]
        fig.add_trace(
            go.Heatmap(z=z, x=x, y=[f"L{L}" for L in first["layer"]], zmin=0, zmax=1, coloraxis="coloraxis"),
            row=1,
            col=i + 1,
        )
    fig.update_layout(title="Cross-format patching: how often the query prompt answers the patched-in fact",
                      coloraxis={"colorscale": "Viridis"}, height=420)  # fmt: skip
    figs.append(fig)
    fig = make_subplots(
        rows=1, cols=len(regimes), subplot_titles=[f"{r}: P(answer) restored after subject noise" for r in regimes]
    )
    for i, r in enumerate(regimes):
        t = result["models"][r]["noise_tracing_resid_pre"]
        fig.add_trace(go.Heatmap(z=t["restored_prob"], x=t["pos"], y=[f"L{L}" for L in t["layers"]], zmin=0, zmax=1,
                                 coloraxis="coloraxis"), row=1, col=i + 1)  # fmt: skip
    which = "held-out" if "n_facts" not in result["facts"] else "the facts'"
    fig.update_layout(
        title=f"Noise tracing (resid_pre) on {which} query prompts", coloraxis={"colorscale": "Viridis"}, height=380
    )
    figs.append(fig)
    return figs


def summary_rows(patching: dict) -> list[str]:
    """results.md rows: per model, the subject hit rate at layer 0, the best layer x role and the unpatched rate."""
    lines = [
        "| model | hit rate: resid_pre subject L0 | best layer x role (resid_pre) | base hit rate |",
        "|---|---|---|---|",
    ]
    for r in patching["labels"]:
        s = patching["models"][r]["sites"]["resid_pre"]
        best = best_site(s, "hit")
        lines.append(
            f"| {r} | {metric_mean(s, 'hit')[0, 0]:.3f} | L{best['layer']} {best['pos']}: {best['value']:.3f} | "
            f"{s['metrics']['hit']['base_mean']:.3f} |"
        )
    return lines


def captioned(patching: dict) -> list[tuple]:
    """Finding 5 and noise tracing for the page, captioned for the pair (reference first)."""
    first, second = labels_of(patching)
    hit, trace = patching_figures(patching)
    best = {r: best_site(patching["models"][r]["sites"]["resid_pre"], "hit")["value"] for r in (first, second)}
    hit_caption = (
        f"Finding 5, cross-format patching: the storage-format state of fact A is patched into the query prompt of "
        f"fact B (same relation) at one layer x role; colour = how often the query then answers A's value. Best cell "
        f"(resid_pre): {second} {best[second]:.1%} vs {first} {best[first]:.1%}. High values mean the storage "
        f"format's state can stand in for the query format's. "
        + versus(best[second], best[first], "mixed training gives format-invariant retrieval")
    )
    trace_caption = (
        "ROME-style noise tracing on the query prompts: noise (3 x embedding std) on the subject, then the clean "
        "residual of one layer x role is restored; colour = probability of the correct answer."
    )
    return [(hit, hit_caption), (trace, trace_caption)]


def run_pair(first: str, second: str, out, *, registry=None, labels=None, context: PairContext = PairContext()):
    return run_patching(first, second, out, registry=registry, labels=labels, **ANALYSIS.sizes(context))


ANALYSIS = Analysis(
    name="patching",
    output="patching.json",
    order=30,
    captioned=captioned,
    run_pair=run_pair,
    summary=summary_rows,
    title=lambda result: "Cross-format patching (storage of A -> query of B)",
    pretrained_sizes={"n_people": 20, "n_pairs": 40},
)
