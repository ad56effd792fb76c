"""Cross-format patching and token-role attribution of a checkpoint pair: ``patching.json`` and ``attribution.json``.

Patching (held-out people, both regimes): the storage-format prompt of person A is the source, the query-format
prompt of person B (same attribute) the base; after patching a (site, layer, role) the metric is the logit
difference A's value - B's value at the query's answer position, and the *hit rate* is how often the base now
answers A's value. Where the storage-format state of a fact can stand in for the query-format state (format-
invariant retrieval, finding 2/5) the hit rate is high. Also recorded: ROME noise tracing on query prompts (restore
the clean state of one layer x role after noising the subject) and an attribution-patching screen checked against
exact patching. Attribution: integrated gradients (plus gradient x input and occlusion) on storage-format prompts of
held-out people, grouped by role (:mod:`mechrecall.attribution`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechrecall.attribution import attribute
from mechrecall.io import atomic_write_json, atomic_write_text
from mechrecall.lab.models import lab_dataset
from mechrecall.loading import load_model
from mechrecall.patching import GaussianNoise, activation_patch, fact_inputs, fact_pairs
from mechrecall.patching.atp import attribution_patch, check_attribution
from mechrecall.report.plotting import page as html

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def _summ(r) -> dict:
    return {"mean": r.mean().tolist(), "layers": r.labels["layer"], "pos": r.labels["pos"]}


def patching_one(model, tokenizer, dataset, *, n_people: int = 40, n_pairs: int = 120, seed: int = 0) -> dict:
    pids = dataset.pids("heldout")[:n_people]
    base, source, rows = fact_pairs(dataset.factset(pids), tokenizer, source_format="storage", base_format="query", n=n_pairs,
                                    seed=seed)  # fmt: skip
    out: dict = {"n_pairs": len(rows), "pairs": rows, "sites": {}}
    sweeps: dict = {}
    for site in SITES:
        sweeps[site] = activation_patch(model, base, source, site=site, metric=["logit_diff", "hit"])  # same forwards
        ld, hit = sweeps[site]["logit_diff"], sweeps[site]["hit"]
        out["sites"][site] = {
            "logit_diff": _summ(ld),
            "logit_diff_base": float(ld.base.mean()),
            "hit_rate": hit.mean().tolist(),
            "hit_rate_base": float(hit.base.mean()),
            "per_example_logit_diff": ld.values.tolist(),
        }
    atp = attribution_patch(model, base, source, site="attn_out")
    out["atp_check_attn_out"] = check_attribution(atp, sweeps["attn_out"]["logit_diff"])
    # ROME tracing on the query prompts of the same people: noise on the subject, restore one clean state
    clean = fact_inputs(tokenizer, dataset.query_examples(pids, templates=[0])[:n_pairs])
    trace = activation_patch(model, clean, clean, site="resid_pre", corruption=GaussianNoise(3.0, seed), metric="prob")
    out["noise_tracing_resid_pre"] = {
        "clean_prob": float(trace.source.mean()),
        "corrupted_prob": float(trace.base.mean()),
        "restored_prob": trace.mean().tolist(),
        "layers": trace.labels["layer"],
        "pos": trace.labels["pos"],
    }
    return out


def run_patching(
    two_stage: str, mixed: str, out: str | Path, *, registry=None, n_people: int = 40, n_pairs: int = 120
) -> dict:
    out = Path(out)
    result: dict = {"people": "heldout", "source_format": "storage", "base_format": "query", "mode": "cross_fact"}
    for label, src in (("two_stage", two_stage), ("mixed", mixed)):
        lm = load_model(src, registry=registry)
        ds = lab_dataset(lm)
        result[label] = {"source": src, **patching_one(lm.model, lm.tokenizer, ds, n_people=n_people, n_pairs=n_pairs)}
    atomic_write_json(out / "patching.json", result)
    atomic_write_text(out / "patching.html", html(patching_figures(result), "mechrecall patching"))
    return result


def run_attribution(
    two_stage: str, mixed: str, out: str | Path, *, registry=None, n_people: int = 20, steps: int = 16
) -> dict:
    out = Path(out)
    result: dict = {"people": "heldout", "format": "storage", "target": "log-prob of the value's first token",
                    "method": "integrated gradients on input embeddings (baseline: mean embedding)"}  # fmt: skip
    for label, src in (("two_stage", two_stage), ("mixed", mixed)):
        lm = load_model(src, registry=registry)
        ds = lab_dataset(lm)
        examples = ds.storage_examples(ds.pids("heldout")[:n_people])
        r = attribute(lm.model, lm.tokenizer, examples, steps=steps, max_steps=256)  # 128 did not converge on bioS
        sr = torch.tensor(r["subject_relation_share_per_fact"])
        g = torch.Generator().manual_seed(0)
        boots = torch.stack([sr[torch.randint(len(sr), (len(sr),), generator=g)].mean() for _ in range(1000)])
        r["subject_relation_share_ci"] = [float(boots.quantile(0.025)), float(boots.quantile(0.975))]
        r["subject_relation_share_std"] = float(sr.std())
        result[label] = {"source": src, **r}
    atomic_write_json(out / "attribution.json", result)
    atomic_write_text(out / "attribution.html", html(attribution_figures(result), "mechrecall attribution"))
    return result


def patching_figures(result: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    regimes = ("two_stage", "mixed")
    figs = []
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{r}: hit rate, storage(A) -> query(B)" for r in regimes])
    for i, r in enumerate(regimes):
        s = result[r]["sites"]
        z = [
            [s[site]["hit_rate"][L][j] for site in SITES for j in range(3)]
            for L in range(len(s["resid_pre"]["hit_rate"]))
        ]
        x = [f"{site}·{pos}" for site in SITES for pos in s["resid_pre"]["logit_diff"]["pos"]]
        fig.add_trace(
            go.Heatmap(z=z, x=x, y=[f"L{L}" for L in range(len(z))], zmin=0, zmax=1, coloraxis="coloraxis"),
            row=1,
            col=i + 1,
        )
    fig.update_layout(title="Cross-format patching: how often the query prompt answers the patched-in fact",
                      coloraxis={"colorscale": "Viridis"}, height=420)  # fmt: skip
    figs.append(fig)
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=[f"{r}: P(answer) restored after subject noise" for r in regimes]
    )
    for i, r in enumerate(regimes):
        t = result[r]["noise_tracing_resid_pre"]
        fig.add_trace(go.Heatmap(z=t["restored_prob"], x=t["pos"], y=[f"L{L}" for L in t["layers"]], zmin=0, zmax=1,
                                 coloraxis="coloraxis"), row=1, col=i + 1)  # fmt: skip
    fig.update_layout(
        title="Noise tracing (resid_pre) on held-out query prompts", coloraxis={"colorscale": "Viridis"}, height=380
    )
    figs.append(fig)
    return figs


def attribution_figures(result: dict) -> list:
    import plotly.graph_objects as go

    fig = go.Figure()
    roles = list(result["mixed"]["per_role"])
    for r in ("two_stage", "mixed"):
        fig.add_trace(go.Bar(name=r, x=roles, y=[result[r]["per_role"][k] for k in roles]))
    fig.update_layout(title="Integrated-gradients share of |attribution| by role (storage format, held-out people)",
                      yaxis_title="share", barmode="group")  # fmt: skip
    box = go.Figure()
    for r in ("two_stage", "mixed"):
        box.add_trace(go.Box(y=result[r]["subject_relation_share_per_fact"], name=r, boxpoints="all"))
    box.update_layout(title="Subject + relation share per fact", yaxis_title="share")
    return [fig, box]


def summary_rows(patching: dict | None, attribution: dict | None) -> list[str]:
    lines: list[str] = []
    if patching:
        lines += [
            "| regime | hit rate: resid_pre subject L0 | best layer x role (resid_pre) | base hit rate |",
            "|---|---|---|---|",
        ]
        for r in ("two_stage", "mixed"):
            s = patching[r]["sites"]["resid_pre"]
            hr = torch.tensor(s["hit_rate"])
            L, j = divmod(int(hr.argmax()), hr.shape[1])
            lines.append(
                f"| {r} | {hr[0, 0]:.3f} | L{L} {s['logit_diff']['pos'][j]}: {hr.max():.3f} | {s['hit_rate_base']:.3f} |"
            )
    if attribution:
        lines += ["", "| regime | subject+relation share (IG) [95% CI] | subject | relation | answer-preceding | subject elsewhere | other context |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in ("two_stage", "mixed"):
            a = attribution[r]
            pr = a["per_role"]
            lines.append(
                f"| {r} | {a['subject_relation_share']:.3f} [{a['subject_relation_share_ci'][0]:.3f}, "
                f"{a['subject_relation_share_ci'][1]:.3f}] | {pr['subject']:.3f} | {pr['relation']:.3f} | "
                f"{pr['answer_preceding']:.3f} | {pr['subject_elsewhere']:.3f} | {pr['other_context']:.3f} |"
            )
    return lines
