"""``DIR/report.html``: one self-contained page with every finding of a reproduction, captioned.

Reads what ``reproduce`` wrote into ``DIR`` (results.json, history.json of each regime, consistency.json,
masks.json, patching.json, attribution.json; whatever exists) and writes one HTML file with plotly's JavaScript
embedded once (nothing is loaded from the network), an accuracy table per regime and attribute, each figure with a
caption that says what it shows and how it compares with the paper (Zhang et al. 2025, arXiv 2505.16178), and a
provenance block (config, seed, package versions, checkpoint hashes, wall time).

The page checks itself: a small script records JavaScript errors and, once plotly has drawn, how many figures have
data and an SVG; ``<pre id="report-check">`` holds the JSON (read by the headless-browser test).

    python -m mechrecall report runs/default        # (re)build runs/default/report.html
"""

from __future__ import annotations

import html as _html
import json
from pathlib import Path

from mechrecall.io import atomic_write_text, sha256_file
from mechrecall.lab.bios import ATTRIBUTES

PAPER = "Zhang et al. 2025 (arXiv 2505.16178)"

_CHECK_JS = """
<script>
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message || e)); });
</script>
"""

_CHECK_AFTER_JS = """
<script>
function __reportCheck() {
  var divs = Array.prototype.slice.call(document.querySelectorAll('.plotly-graph-div'));
  var empty = [];
  divs.forEach(function (d, i) {
    var hasData = (d.data || []).some(function (t) {
      var n = ['x', 'y', 'z', 'values'].map(function (k) { return t[k] ? t[k].length : 0; });
      return Math.max.apply(null, n) > 0;
    });
    var drawn = d.querySelector('.main-svg') !== null;
    if (!hasData || !drawn) { empty.push(i); }
  });
  var out = {figures: divs.length, empty: empty, errors: window.__reportErrors, plotly: typeof Plotly !== 'undefined'};
  document.getElementById('report-check').textContent = JSON.stringify(out);
}
window.addEventListener('load', function () { setTimeout(__reportCheck, 500); });
</script>
"""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.caption{color:#444;margin:0 0 2.5em 0}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:12px}h2{margin-top:2em;border-bottom:1px solid #ddd}
"""


def _load(path: Path, expect: type = dict):
    """A run's JSON file (None when absent); one error naming the file when it is not a JSON ``expect``."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, expect):
        raise ValueError(f"{path}: expected a JSON {expect.__name__}, got {type(data).__name__}")
    return data


def _sha256(path: Path) -> str | None:
    return sha256_file(path) if path.exists() else None


def _seed_dir(results: dict, run: Path) -> Path:
    """The first seed's folder: as recorded, or beside results.json when the run folder was moved."""
    recorded = Path(results["per_seed"][0]["run_dir"])
    return recorded if recorded.exists() else run / recorded.name


def _table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else _html.escape(str(v))

    head = "".join(f"<th>{_html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _versus(value: float, reference: float, claim: str, margin: float = 0.0) -> str:
    """The paper's claim, and whether this run agrees: ``value`` must exceed ``reference`` by more than ``margin``
    (e.g. twice the spread of random controls); within the margin the run shows no clear difference."""
    if value - reference > margin:
        verdict = "agrees in direction"
    elif reference - value > margin:
        verdict = "does not agree"
    else:
        verdict = "shows no clear difference (within twice the spread of the random controls)"
    return f"The paper: {claim}. This run {verdict}."


def _recall_figures(results: dict, run: Path) -> list[tuple]:
    import plotly.graph_objects as go

    reg = results["regimes"]
    keys = [("heldout_qa", "held-out QA"), ("trained_qa", "trained QA"), ("storage", "storage")]
    fig = go.Figure()
    for regime in ("two_stage", "mixed"):
        fig.add_trace(go.Bar(name=regime, x=[k[1] for k in keys], y=[reg[regime][k[0]] for k in keys]))
    fig.update_layout(
        title="Exact-match recall per regime", yaxis_title="fraction", yaxis_range=[0, 1], barmode="group"
    )
    out = [
        (
            fig,
            f"Greedy exact-match recall. Mixed training answers held-out QA at {reg['mixed']['heldout_qa']:.1%} vs "
            f"{reg['two_stage']['heldout_qa']:.1%} for two-stage; trained QA {reg['mixed']['trained_qa']:.1%} / "
            f"{reg['two_stage']['trained_qa']:.1%}. {PAPER} and Allen-Zhu & Li report ~87% vs ~10% on held-out "
            "people with far larger models and budgets. "
            + _versus(reg["mixed"]["heldout_qa"], reg["two_stage"]["heldout_qa"], "mixed > two-stage on held-out QA"),
        )
    ]
    curves = go.Figure()
    seed_dir = _seed_dir(results, run)
    for regime in ("two_stage", "mixed"):
        hist = _load(seed_dir / regime / "history.json", list) or []
        pts = [h for h in hist if "heldout_qa" in h]
        for key, dash in (("heldout_qa", None), ("trained_qa", "dot"), ("storage", "dash")):
            curves.add_trace(
                go.Scatter(x=[h["global_step"] for h in pts], y=[h.get(key) for h in pts], mode="lines+markers",
                           name=f"{regime} · {key}", line={"dash": dash} if dash else {})
            )  # fmt: skip
    if curves.data:
        curves.update_layout(
            title="Recall during training (first seed)", xaxis_title="global step", yaxis_title="fraction"
        )
        out.append(
            (
                curves,
                "Recall logged during training. Held-out QA was only logged, never used to stop or choose anything "
                "(stage 2 stops on trained QA; budgets were fixed on the validation people). Storage recall is logged "
                "too, so forgetting during stage 2 is visible next to the held-out curve.",
            )
        )
    return out


def _captioned(consistency, masks, patching, attribution) -> list[tuple]:
    """(figure, caption) pairs of every finding whose JSON the run has, in the order the page shows them."""
    out: list[tuple] = []
    for result, captioned in ((consistency, _consistency_figures), (masks, _masks_figures),
                              (patching, _patching_figures), (attribution, _attribution_figures)):  # fmt: skip
        if result:
            out += captioned(result)
    return out


def _consistency_figures(consistency: dict) -> list[tuple]:
    out: list[tuple] = []
    from mechrecall.report.consistency import figures as cfigs

    g, r = consistency["gradient"], consistency["representation"]
    grad, rep = cfigs(consistency)
    out.append(
        (
            grad,
            f"Finding 1, gradient consistency: cosine between the gradients of the storage-format and the "
            f"query-format answer loss of the same held-out fact, overall and per block (95% bootstrap CIs). "
            f"Mixed {g['mixed']['same_fact_mean_cos']:.3f} vs two-stage {g['two_stage']['same_fact_mean_cos']:.3f}; "
            f"mismatched facts give ~{g['mixed']['baseline_mean_cos']:.3f}. "
            + _versus(
                g["mixed"]["same_fact_mean_cos"],
                g["two_stage"]["same_fact_mean_cos"],
                "mixed training aligns the two formats' gradients",
            ),
        )
    )
    out.append(
        (
            rep,
            f"Finding 2, representation consistency: cosine of the same fact's hidden states in both formats "
            f"minus that of mismatched facts, per layer and token role. Last-layer subject margin mixed "
            f"{r['mixed']['subject_last_layer_margin']:.3f} vs two-stage "
            f"{r['two_stage']['subject_last_layer_margin']:.3f}; final-token margin "
            f"{r['mixed']['final_last_layer_margin']:.3f} vs {r['two_stage']['final_last_layer_margin']:.3f}. "
            + _versus(
                r["mixed"]["final_last_layer_margin"],
                r["two_stage"]["final_last_layer_margin"],
                "mixed training makes a fact's representations in the two formats more alike",
            ),
        )
    )
    return out


def _masks_figures(masks: dict) -> list[tuple]:
    out: list[tuple] = []
    from mechrecall.report.masks import figures as mfigs

    size, heat, abl, gr = mfigs(masks)
    m, t = masks["mixed"], masks["two_stage"]
    out += [
        (
            size,
            f"Finding 3, shared-update parameters: the top-k fraction of block weights by each format's training "
            f"importance (mean |gradient| from the training trace), intersected. At k = {masks['k']}: mixed "
            f"{m['shared_fraction']:.4f} vs two-stage {t['shared_fraction']:.4f} of block weights (random "
            f"overlap {m['random_expectation']['shared_fraction']:.4f}). "
            + _versus(m["shared_fraction"], t["shared_fraction"], "the shared set is much larger under mixed training"),
        ),
        (
            heat,
            "Where the shared set lies: fraction of each attention head's parameters (q/o slices plus its "
            "key/value head's share) that are shared, per layer.",
        ),  # fmt: skip
        (
            abl,
            f"Ablation: resetting the shared set to the base weights. At k = {masks['k']} mixed's held-out QA "
            f"drops {m['ablation']['shared_drop']:.1f} points vs {m['ablation']['random_drop_mean']:.1f} ± "
            f"{m['ablation']['random_drop_std']:.1f} for size-matched random masks. "
            + _versus(
                m["ablation"]["shared_drop"],
                m["ablation"]["random_drop_mean"],
                "ablating the shared set breaks held-out recall (more than random masks)",
                2 * m["ablation"]["random_drop_std"],
            ),
        ),
        (
            gr,
            f"Grafting mixed's shared parameters into the two-stage model: held-out QA "
            f"{m['grafting']['heldout_before']:.3f} -> {m['grafting']['heldout_after']:.3f} (random masks "
            f"{m['grafting']['random_heldout_mean']:.3f} ± {m['grafting']['random_heldout_std']:.3f}). "
            + _versus(
                m["grafting"]["heldout_after"],
                m["grafting"]["random_heldout_mean"],
                "grafting the shared set transfers held-out recall",
                2 * m["grafting"]["random_heldout_std"],
            ),
        ),
    ]
    return out


def _extra(run: Path, name: str) -> dict | None:
    """A beyond-the-paper result beside the run: ``run/NAME.json`` or ``run/NAME/NAME.json`` (what the documented commands
    write), else None."""
    return _load(run / f"{name}.json") or _load(run / name / f"{name}.json")


def _remedy_figures(grafting: dict | None, predict: dict | None, remedy: dict | None) -> list[tuple]:
    """Grafting variants, early prediction of generalization and the consistency-aware objectives, where present."""
    out: list[tuple] = []
    if grafting:
        from mechrecall.report.grafting import figure as gfig

        best = "; ".join(
            f"into {lab}: best on validation people {b['source']} at {b['fraction']:.4%} of the ranked weights, "
            f"held-out {b['before']:.3f} -> {b['heldout_after']:.3f} (random {b['random_heldout_mean']:.3f})"
            for lab, b in grafting["best"].items()
        )
        out.append((gfig(grafting), "Grafting, every protocol variant (analyses/grafting.py): masks of the mixed "
                    f"model's trace and update size at {len(grafting['ks'])} sizes, into each recipient, against "
                    f"size-matched random masks. {best}. Any variant beats its random controls by more than "
                    f"max(5 points, 2 sd) (a post-hoc screen over every variant): {grafting['any_transfer']}."))  # fmt: skip
    if predict:
        import plotly.graph_objects as go

        fig = go.Figure()
        for frac, res in predict["correlations"].items():
            fig.add_trace(go.Bar(name=f"at {float(frac):.0%} of the budget", x=[r["predictor"] for r in res],
                                 y=[r["rho"] for r in res],
                                 error_y={"type": "data", "symmetric": False,
                                          "array": [r["ci"][1] - r["rho"] for r in res],
                                          "arrayminus": [r["rho"] - r["ci"][0] for r in res]}))  # fmt: skip
        fig.update_layout(barmode="group", yaxis_title="Spearman rho with final held-out QA", yaxis_range=[-1, 1],
                          title=f"Early measures as predictors ({len(predict['runs'])} runs)")  # fmt: skip
        out.append((fig, "Early prediction (analyses/predict_generalization.py): Spearman correlation of each measure "
                    "at a fixed fraction of a run's budget with the run's final held-out QA, with 95 % bootstrap "
                    "intervals over runs; consistency is measured on the validation people."))  # fmt: skip
    if remedy:
        import plotly.graph_objects as go

        stats = remedy["stats"]
        names = list(stats)
        fig = go.Figure()
        for metric in ("validation_qa", "heldout_qa"):
            fig.add_trace(go.Bar(name=metric, x=names, y=[stats[n][metric]["mean"] for n in names],
                                 error_y={"type": "data", "array": [stats[n][metric]["sd"] for n in names]}))  # fmt: skip
        fig.update_layout(barmode="group", yaxis_title="exact match (mean ± sd over seeds)",
                          title="Consistency-aware objectives against plain two-stage and mixed")  # fmt: skip
        closed = "; ".join(f"{n}: {v:.0%}" if v is not None else f"{n}: n/a" for n, v in remedy["gap_closed"].items())
        over = "; ".join(f"{n}: {100 * v:+.1f} points" for n, v in remedy.get("over_mixed", {}).items())
        seeds = remedy.get("confirmation_seeds", remedy["seeds"])  # what the means and the bars are over
        out.append((fig, f"Consistency-aware objectives (analyses/remedy.py, preset {remedy['preset']}, means over "
                    f"seeds {seeds}): each family's variant chosen by validation QA at seed 0 "
                    f"({remedy['chosen']}); share of the two-stage-to-mixed held-out gap it closes: {closed}; "
                    f"held-out QA against plain mixed: {over}. "
                    f"Every variant tried is in remedy.json."))  # fmt: skip
    return out


def _patching_figures(patching: dict) -> list[tuple]:
    out: list[tuple] = []
    from mechrecall.report.patching import patching_figures

    hit, trace = patching_figures(patching)
    best = {r: max(max(row) for row in patching[r]["sites"]["resid_pre"]["hit_rate"]) for r in ("two_stage", "mixed")}
    out += [
        (
            hit,
            f"Finding 5, cross-format patching: the storage-format state of person A (held-out) is patched into "
            f"the query prompt of person B at one layer x role; colour = how often the query then answers A's "
            f"value. Best cell (resid_pre): mixed {best['mixed']:.1%} vs two-stage {best['two_stage']:.1%}. "
            "High values mean the storage format's state can stand in for the query format's. "
            + _versus(best["mixed"], best["two_stage"], "mixed training gives format-invariant retrieval"),
        ),
        (
            trace,
            "ROME-style noise tracing on held-out query prompts: noise (3 x embedding std) on the subject, "
            "then the clean residual of one layer x role is restored; colour = probability of the correct answer.",
        ),  # fmt: skip
    ]
    return out


def _attribution_figures(attribution: dict) -> list[tuple]:
    out: list[tuple] = []
    from mechrecall.report.patching import attribution_figures

    bars, box = attribution_figures(attribution)
    a, b = attribution["mixed"], attribution["two_stage"]
    out += [
        (
            bars,
            f"Finding 4, input signature: integrated-gradients share of absolute attribution per role for the "
            f"storage-format value (held-out people). Subject + relation tokens: mixed "
            f"{a['subject_plus_relation_share']:.3f} [{a['subject_plus_relation_share_ci'][0]:.3f}, "
            f"{a['subject_plus_relation_share_ci'][1]:.3f}] vs two-stage {b['subject_plus_relation_share']:.3f} "
            f"[{b['subject_plus_relation_share_ci'][0]:.3f}, {b['subject_plus_relation_share_ci'][1]:.3f}]; with the "
            f"answer-preceding token added: mixed {a['subject_relation_preceding_share']:.3f} vs two-stage "
            f"{b['subject_relation_preceding_share']:.3f}. "
            + _versus(
                a["subject_plus_relation_share"],
                b["subject_plus_relation_share"],
                "mixed models read the fact from the subject and relation tokens, two-stage models from "
                "the whole context",
            ),
        ),
        (
            box,
            "Subject + relation share per fact (each point one held-out fact; the answer-preceding token not included).",
        ),
    ]
    return out


def _recall_section(results: dict) -> list[str]:
    """The page's heading and the recall tables (per regime; held-out QA per attribute; the gap)."""
    reg = results["regimes"]
    parts = [f"<h1>mechrecall: preset <code>{_html.escape(results['preset'])}</code>, seeds {results['seeds']}</h1>"]
    parts.append(
        "<p>Facts injected by fine-tuning in a storage format (biographies) and a query format (QA); two-stage vs "
        f"mixed training. Every number below was measured in this run; the captions compare with {PAPER}.</p>"
    )
    keys = ["heldout_qa", "trained_qa", "validation_qa", "storage", "storage_after_stage1"]
    rows = [[r, *[reg[r].get(k, "–") for k in keys]] for r in ("two_stage", "mixed")]
    parts.append("<h2>Recall</h2>" + _table(["regime", "held-out QA", "trained QA", "validation QA", "storage",
                                             "storage after stage 1"], rows))  # fmt: skip
    first = results["per_seed"][0]["regimes"]
    per_attr = [[a, first["two_stage"]["per_attribute"]["heldout_qa"][a], first["mixed"]["per_attribute"]["heldout_qa"][a]]
                for a in ATTRIBUTES]  # fmt: skip
    parts.append(
        "<p>Held-out QA per attribute (first seed):</p>" + _table(["attribute", "two-stage", "mixed"], per_attr)
    )
    parts.append(f"<p>Gap (mixed − two-stage held-out QA): {results['gap']['mean']:.3f}</p>")
    return parts


def _provenance(results: dict, run: Path, masks: dict | None) -> str:
    """Config, seed, versions, wall times, checkpoint hashes: enough to tell which run a page describes."""
    prov = dict(results.get("provenance", {}))
    prov["wall_seconds"] = results.get("wall_seconds")
    prov["analysis_seconds"] = results.get("analysis_seconds")
    seed_dir = _seed_dir(results, run)
    prov["checkpoints_sha256"] = {
        name: _sha256(seed_dir / sub / "model.safetensors")
        for name, sub in (("base", "data/base"), ("two_stage_stage1", "two_stage/stage1"),
                          ("two_stage", "two_stage/final"), ("mixed", "mixed/final"))
    }  # fmt: skip
    prov["dataset_hash"] = (masks or {}).get("dataset_hash")
    return "<h2>Provenance</h2><pre>" + _html.escape(json.dumps(prov, indent=2)) + "</pre>"


def build(run: str | Path) -> Path:
    """Write ``run/report.html`` from the JSON files in ``run`` and return its path."""
    import plotly.offline

    run = Path(run)
    results = _load(run / "results.json")
    if results is None:
        raise FileNotFoundError(f"{run / 'results.json'} does not exist: run `python -m mechrecall reproduce` first")
    if not isinstance(results.get("regimes"), dict):
        raise ValueError(f"{run / 'results.json'}: not a reproduce result (no 'regimes' table)")
    consistency = _load(run / "consistency.json")
    masks = _load(run / "masks.json")
    patching = _load(run / "patching.json")
    attribution = _load(run / "attribution.json")
    try:
        figs = _recall_figures(results, run) + _captioned(consistency, masks, patching, attribution)
    except KeyError as e:  # a result file from an older version (keys renamed since): say which, not just the key
        raise ValueError(
            f"{run}: a result file lacks the key {e} (written by an older version of mechrecall?): rerun its analysis "
            f"(python -m mechrecall reproduce with --force redoes all)"
        ) from None
    figs += _remedy_figures(*(_extra(run, n) for n in ("grafting", "predict", "remedy")))

    parts = _recall_section(results)
    parts.append("<h2>Figures</h2>")
    for i, (fig, caption) in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}"))
        parts.append(f"<p class='caption'>{_html.escape(caption)}</p>")

    parts.append(_provenance(results, run, masks))
    parts.append("<pre id='report-check'>pending</pre>")

    plotly_js = plotly.offline.get_plotlyjs()
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mechrecall report</title>"
        f"<style>{_CSS}</style>{_CHECK_JS}<script type='text/javascript'>{plotly_js}</script></head><body>"
        + "\n".join(parts)
        + _CHECK_AFTER_JS
        + "</body></html>"
    )
    return atomic_write_text(run / "report.html", page)
