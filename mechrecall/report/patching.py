"""Cross-format patching and token-role attribution of a checkpoint pair: ``patching.json`` and ``attribution.json``.

Patching (held-out people, both regimes): the storage-format prompt of person A is the source, the query-format
prompt of person B (same attribute) the base; after patching a (site, layer, role) the metric is the logit
difference A's value - B's value at the query's answer position, and the *hit rate* is how often the base now
answers A's value. Where the storage-format state of a fact can stand in for the query-format state (format-
invariant retrieval, finding 2/5) the hit rate is high. Also recorded: ROME noise tracing on query prompts (restore
the clean state of one layer x role after noising the subject) and an attribution-patching screen checked against
exact patching. Attribution: integrated gradients (plus gradient x input and occlusion) on storage-format prompts of
held-out people, grouped by role (:mod:`mechrecall.attribution`).

With ``facts=`` (a fact file, ``datasets.Dataset`` or :class:`~mechrecall.facts.FactSet`) both run on any two
checkpoints instead (registry names, folders, Hugging Face ids, GGUF; the same one twice is fine): pairs are drawn
within each relation of the facts, results are keyed by checkpoint label (``labels`` in the JSON), and ``sites`` /
``layers`` narrow the sweep (a 30-layer model has 4 x 30 x 3 cells per pair otherwise).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechrecall.attribution import attribute
from mechrecall.devices import model_device, model_dtype
from mechrecall.facts import FactSet
from mechrecall.io import atomic_write_files
from mechrecall.lab.models import lab_dataset
from mechrecall.patching import GaussianNoise, activation_patch, fact_inputs, fact_pairs
from mechrecall.patching.atp import attribution_patch, check_attribution
from mechrecall.patching.prompts import DEFAULT_ROLES
from mechrecall.report.consistency import check_labels, load_each, unique_labels, user_facts
from mechrecall.report.plotting import page as html
from mechrecall.tokenization import check_tokenization

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def _summ(r) -> dict:
    return {"mean": r.mean().tolist(), "layers": r.labels["layer"], "pos": r.labels["pos"]}


def _layers_of(result, layers):
    """``result`` (every layer) cut to ``layers`` (as an exact sweep over those layers labels them)."""
    from dataclasses import replace

    if layers is None:
        return result
    idx = [result.labels["layer"].index(L) for L in layers]
    return replace(result, values=result.values[idx], labels={**result.labels, "layer": list(layers)})


def patch_roles(facts: FactSet, formats=("storage", "query")) -> tuple[str, ...]:
    """The roles every first text of ``formats`` has: subject, relation (when located), final."""
    texts = [ex for fmt in formats for ex in facts.examples(fmt, templates=[0])]
    return tuple(r for r in DEFAULT_ROLES if r == "final" or all(ex.spans.get(r) for ex in texts))


def patching_one(
    model,
    tokenizer,
    facts,
    *,
    n_people: int = 40,
    n_pairs: int = 120,
    seed: int = 0,
    sites=SITES,
    layers=None,
    roles=None,
    whole_answer: bool = False,
) -> dict:
    """Cross-format patching on ``facts`` (a :class:`FactSet`; a lab dataset: its first ``n_people`` held-out people),
    at ``sites`` x ``layers`` (default: every layer) x ``roles`` (default: those every text has), then AtP (checked
    against the ``attn_out`` sweep when it ran) and noise tracing on the facts' query prompts. ``whole_answer``
    adds the whole-answer metrics (``answer_logprob`` of the source fact's whole answer, ``answer_match``: every
    answer token is the argmax) to the first-token ones, from the same forwards."""
    if not isinstance(facts, FactSet):  # a lab dataset
        facts = facts.factset(facts.pids("heldout")[:n_people])
    roles = patch_roles(facts) if roles is None else tuple(roles)
    base, source, rows = fact_pairs(facts, tokenizer, source_format="storage", base_format="query", n=n_pairs,
                                    seed=seed, roles=roles, whole_answer=whole_answer)  # fmt: skip
    out: dict = {"n_pairs": len(rows), "pairs": rows, "sites": {}}
    sweeps: dict = {}
    metrics = ["logit_diff", "hit", *(("answer_logprob", "answer_match") if whole_answer else ())]
    for site in sites:
        sweeps[site] = activation_patch(model, base, source, site=site, layers=layers, metric=metrics)  # same forwards
        ld, hit = sweeps[site]["logit_diff"], sweeps[site]["hit"]
        out["sites"][site] = {
            "logit_diff": _summ(ld),
            "logit_diff_base": float(ld.base.mean()),
            "hit_rate": hit.mean().tolist(),
            "hit_rate_base": float(hit.base.mean()),
            "per_example_logit_diff": ld.values.tolist(),
        }
        if whole_answer:
            lp, match = sweeps[site]["answer_logprob"], sweeps[site]["answer_match"]
            out["sites"][site] |= {
                "answer_logprob": _summ(lp),
                "answer_logprob_base": float(lp.base.mean()),
                "answer_logprob_source": float(lp.source.mean()),
                "answer_match_rate": match.mean().tolist(),
                "answer_match_rate_base": float(match.base.mean()),
            }
    if "attn_out" in sweeps:
        atp = attribution_patch(model, base, source, site="attn_out")
        out["atp_check_attn_out"] = check_attribution(_layers_of(atp, layers), sweeps["attn_out"]["logit_diff"])
    # ROME tracing on the query prompts of the same facts: noise on the subject, restore one clean state
    clean = fact_inputs(tokenizer, facts.examples("query", templates=[0])[:n_pairs], roles=roles)
    trace = activation_patch(model, clean, clean, site="resid_pre", layers=layers, corruption=GaussianNoise(3.0, seed),
                             metric="prob")  # fmt: skip
    out["noise_tracing_resid_pre"] = {
        "clean_prob": float(trace.source.mean()),
        "corrupted_prob": float(trace.base.mean()),
        "restored_prob": trace.mean().tolist(),
        "layers": trace.labels["layer"],
        "pos": trace.labels["pos"],
    }
    return out


def _pair(two_stage: str, mixed: str, facts, labels) -> list[tuple[str, str]]:
    """(label, source) per checkpoint: the lab's regimes, or the given labels / the sources (made unique)."""
    if facts is None and labels is None:
        return [("two_stage", two_stage), ("mixed", mixed)]
    return list(zip(check_labels(labels, 2) or unique_labels([two_stage, mixed]), (two_stage, mixed)))


def _settings(facts: FactSet | None, loaded) -> dict:
    if facts is None:
        return {"people": "heldout"}
    return {"facts": facts.source, "n_facts": len(facts), "device": str(model_device(loaded.model)),
            "dtype": str(model_dtype(loaded.model)).removeprefix("torch.")}  # fmt: skip


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
    fs = user_facts(facts, split, n_people) if facts is not None else None
    pair = _pair(two_stage, mixed, fs, labels)
    loads = load_each([src for _, src in pair], registry=registry, device=device, dtype=dtype)
    result: dict = {**_settings(fs, loads[0]), "source_format": "storage", "base_format": "query",
                    "mode": "cross_fact"}  # fmt: skip
    if fs is not None or [label for label, _ in pair] != ["two_stage", "mixed"]:  # renamed lab regimes too
        result["labels"] = [label for label, _ in pair]
    done: dict = {}  # the same checkpoint twice: measured once (the sweep is deterministic)
    for (label, src), lm in zip(pair, loads):
        if fs is None:
            these = lab_dataset(lm)
        else:
            these = check_tokenization(fs, lm.tokenizer, patch_roles(fs), src)
        if id(lm) not in done:
            done[id(lm)] = patching_one(lm.model, lm.tokenizer, these, n_people=n_people, n_pairs=n_pairs, sites=sites,
                                        layers=layers, whole_answer=fs is not None)  # fmt: skip
        result[label] = {"source": src, **done[id(lm)]}
    atomic_write_files(
        out, {"patching.json": result, "patching.html": html(patching_figures(result), "mechrecall patching")}
    )
    return result


def run_attribution(
    two_stage: str,
    mixed: str,
    out: str | Path,
    *,
    registry=None,
    n_people: int = 20,
    steps: int = 16,
    max_steps: int = 256,
    fix_first: bool = True,
    facts=None,
    split: str | None = None,
    labels=None,
    device=None,
    dtype=None,
) -> dict:
    """Token-role attribution of a lab pair (storage prompts of held-out people), or of any two checkpoints on the
    first storage text of each of ``facts`` (its ``split``, first ``n_people`` facts); each fact's IG steps double
    from ``steps`` up to ``max_steps`` until complete (``fix_first``: position 0 is held fixed, see
    :func:`mechrecall.attribution.role_inputs`); writes ``attribution.json`` and ``attribution.html``."""
    out = Path(out)
    fs = user_facts(facts, split, n_people, formats=("storage",)) if facts is not None else None
    pair = _pair(two_stage, mixed, fs, labels)
    loads = load_each([src for _, src in pair], registry=registry, device=device, dtype=dtype)
    result: dict = {**_settings(fs, loads[0]), "format": "storage", "target": "log-prob of the value's first token",
                    "method": "integrated gradients on input embeddings (baseline: mean embedding)"}  # fmt: skip
    if fs is not None or [label for label, _ in pair] != ["two_stage", "mixed"]:  # renamed lab regimes too
        result["labels"] = [label for label, _ in pair]
    done: dict = {}  # the same checkpoint twice: attributed once (deterministic)
    for (label, src), lm in zip(pair, loads):
        if id(lm) in done:
            result[label] = {**done[id(lm)], "source": src}
            continue
        if fs is None:
            ds = lab_dataset(lm)
            examples = ds.storage_examples(ds.pids("heldout")[:n_people])
        else:
            examples = check_tokenization(fs, lm.tokenizer, ("subject", "final"), src).examples(
                "storage", templates=[0]
            )
        r = attribute(lm.model, lm.tokenizer, examples, steps=steps, max_steps=max_steps, fix_first=fix_first)
        for key in ("subject_plus_relation_share", "subject_relation_preceding_share"):
            sr = torch.tensor(r[f"{key}_per_fact"])
            g = torch.Generator().manual_seed(0)  # (the same resamples for both sums)
            boots = torch.stack([sr[torch.randint(len(sr), (len(sr),), generator=g)].mean() for _ in range(1000)])
            r[f"{key}_ci"] = [float(boots.quantile(0.025)), float(boots.quantile(0.975))]
            r[f"{key}_std"] = float(sr.std()) if len(sr) > 1 else 0.0
        result[label] = done[id(lm)] = {"source": src, **r}
    page = html(attribution_figures(result), "mechrecall attribution")
    atomic_write_files(out, {"attribution.json": result, "attribution.html": page})
    return result


def labels_of(result: dict) -> list[str]:
    """The checkpoints of a patching / attribution result: its ``labels``, else the lab's two regimes."""
    return list(result.get("labels", ("two_stage", "mixed")))


def patching_figures(result: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    regimes = labels_of(result)
    figs = []
    fig = make_subplots(rows=1, cols=len(regimes),
                        subplot_titles=[f"{r}: hit rate, storage(A) -> query(B)" for r in regimes])  # fmt: skip
    for i, r in enumerate(regimes):
        s = result[r]["sites"]
        sites = list(s)
        first = s[sites[0]]["logit_diff"]
        z = [
            [s[site]["hit_rate"][L][j] for site in sites for j in range(len(first["pos"]))]
            for L in range(len(first["layers"]))
        ]
        x = [f"{site}·{pos}" for site in sites for pos in first["pos"]]
        fig.add_trace(
            go.Heatmap(z=z, x=x, y=[f"L{L}" for L in first["layers"]], zmin=0, zmax=1, coloraxis="coloraxis"),
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
        t = result[r]["noise_tracing_resid_pre"]
        fig.add_trace(go.Heatmap(z=t["restored_prob"], x=t["pos"], y=[f"L{L}" for L in t["layers"]], zmin=0, zmax=1,
                                 coloraxis="coloraxis"), row=1, col=i + 1)  # fmt: skip
    which = "held-out" if "facts" not in result else "the facts'"
    fig.update_layout(
        title=f"Noise tracing (resid_pre) on {which} query prompts", coloraxis={"colorscale": "Viridis"}, height=380
    )
    figs.append(fig)
    return figs


def attribution_figures(result: dict) -> list:
    import plotly.graph_objects as go

    fig = go.Figure()
    regimes = labels_of(result)
    roles = list(result[regimes[-1]]["per_role"])
    for r in regimes:
        fig.add_trace(go.Bar(name=r, x=roles, y=[result[r]["per_role"][k] for k in roles]))
    which = "held-out people" if "facts" not in result else "the facts' storage texts"
    fig.update_layout(title=f"Integrated-gradients share of |attribution| by role (storage format, {which})",
                      yaxis_title="share", barmode="group")  # fmt: skip
    box = go.Figure()
    for r in regimes:
        box.add_trace(go.Box(y=result[r]["subject_plus_relation_share_per_fact"], name=r, boxpoints="all"))
    box.update_layout(title="Subject + relation share per fact", yaxis_title="share")
    return [fig, box]


def summary_rows(patching: dict | None, attribution: dict | None) -> list[str]:
    lines: list[str] = []
    if patching:
        lines += [
            "| regime | hit rate: resid_pre subject L0 | best layer x role (resid_pre) | base hit rate |",
            "|---|---|---|---|",
        ]
        for r in labels_of(patching):
            s = patching[r]["sites"]["resid_pre"]
            hr = torch.tensor(s["hit_rate"])
            li, j = divmod(int(hr.argmax()), hr.shape[1])
            L = s["logit_diff"].get("layers", list(range(hr.shape[0])))[li]
            lines.append(
                f"| {r} | {hr[0, 0]:.3f} | L{L} {s['logit_diff']['pos'][j]}: {hr.max():.3f} | {s['hit_rate_base']:.3f} |"
            )
    if attribution:
        lines += ["", "| regime | subject + relation (IG) [95% CI] | + answer-preceding [95% CI] | subject | relation | answer-preceding | subject elsewhere | other context |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in labels_of(attribution):
            a = attribution[r]
            pr = a["per_role"]
            sr, srp = a["subject_plus_relation_share"], a["subject_relation_preceding_share"]
            sr_ci, srp_ci = a["subject_plus_relation_share_ci"], a["subject_relation_preceding_share_ci"]
            lines.append(
                f"| {r} | {sr:.3f} [{sr_ci[0]:.3f}, {sr_ci[1]:.3f}] | {srp:.3f} [{srp_ci[0]:.3f}, {srp_ci[1]:.3f}] | "
                f"{pr['subject']:.3f} | {pr['relation']:.3f} | {pr['answer_preceding']:.3f} | "
                f"{pr['subject_elsewhere']:.3f} | {pr['other_context']:.3f} |"
            )
    return lines
