"""Token-role attribution of a checkpoint pair: ``attribution.json``.

Integrated gradients (plus gradient x input and occlusion) on storage-format prompts, grouped by role
(:mod:`mechrecall.attribution`): how much of the storage-format value's log-probability each token role carries. The
paper's finding 4: a model that generalises reads the fact from the subject and relation tokens. Lab pairs use the
held-out people's storage prompts; with ``facts=`` any two checkpoints are attributed on the first storage text of
each fact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechrecall.attribution import attribute
from mechrecall.devices import model_device, model_dtype
from mechrecall.facts import FactSet, select_facts
from mechrecall.io import atomic_write_files
from mechrecall.lab.models import lab_dataset
from mechrecall.loading import load_each
from mechrecall.plotting import page as html
from mechrecall.report.analysis import Analysis, PairContext, labels_of, pair_labels, versus
from mechrecall.tokenization import check_tokenization

__all__ = ["run_attribution", "attribution_figures", "summary_rows", "captioned", "ANALYSIS"]


def _settings(facts: FactSet | None, loaded) -> dict:
    if facts is None:
        return {"people": "heldout"}
    return {"facts": facts.source, "n_facts": len(facts), "device": str(model_device(loaded.model)),
            "dtype": str(model_dtype(loaded.model)).removeprefix("torch.")}  # fmt: skip


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
    fs = select_facts(facts, split, n_people, formats=("storage",)) if facts is not None else None
    pair = pair_labels(two_stage, mixed, fs, labels)
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


def summary_rows(attribution: dict) -> list[str]:
    """results.md rows: per model, the subject + relation share and the roles' shares, with 95 % intervals."""
    lines = ["| model | subject + relation (IG) [95% CI] | + answer-preceding [95% CI] | subject | relation | "
             "answer-preceding | subject elsewhere | other context |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
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


def captioned(attribution: dict) -> list[tuple]:
    """Finding 4 for the page, captioned for the pair (reference first)."""
    first, second = labels_of(attribution)
    bars, box = attribution_figures(attribution)
    a, b = attribution[second], attribution[first]
    ci = lambda x, k: f"[{x[k + '_ci'][0]:.3f}, {x[k + '_ci'][1]:.3f}]"  # noqa: E731
    bars_caption = (
        f"Finding 4, input signature: integrated-gradients share of absolute attribution per role for the "
        f"storage-format value. Subject + relation tokens: {second} {a['subject_plus_relation_share']:.3f} "
        f"{ci(a, 'subject_plus_relation_share')} vs {first} {b['subject_plus_relation_share']:.3f} "
        f"{ci(b, 'subject_plus_relation_share')}; with the answer-preceding token added: {second} "
        f"{a['subject_relation_preceding_share']:.3f} vs {first} {b['subject_relation_preceding_share']:.3f}. "
        + versus(a["subject_plus_relation_share"], b["subject_plus_relation_share"],
                 "mixed models read the fact from the subject and relation tokens, two-stage models from the whole "
                 "context", intervals=(a["subject_plus_relation_share_ci"], b["subject_plus_relation_share_ci"]))
    )  # fmt: skip
    box_caption = "Subject + relation share per fact (each point one fact; the answer-preceding token not included)."
    return [(bars, bars_caption), (box, box_caption)]


def run_pair(first: str, second: str, out, *, registry=None, labels=None, context: PairContext = PairContext()):
    return run_attribution(first, second, out, registry=registry, labels=labels, **ANALYSIS.sizes(context))


ANALYSIS = Analysis(
    name="attribution",
    output="attribution.json",
    order=40,
    captioned=captioned,
    run_pair=run_pair,
    summary=summary_rows,
    title=lambda result: "Token-role attribution (storage format)",
    # IG on SmolLM2's biography prefixes: about 6 s a quadrature step for 24 prompts on 2 CPU cores, and prompts that
    # need 128 steps (16 + 32 + 64 + 128 computed) are common, so 10 people at up to 256 steps ran for hours
    pretrained_sizes={"n_people": 4, "max_steps": 128},
)
