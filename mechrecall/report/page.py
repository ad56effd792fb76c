"""``DIR/report.html``: one self-contained page with every finding of a reproduction, captioned.

Reads what ``reproduce`` wrote into ``DIR`` (results.json, history.json of each regime, and the JSON of every
registered analysis that exists, :mod:`mechrecall.report.analysis`) and writes one HTML file with plotly's JavaScript
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
from mechrecall.report.analysis import PAPER, analyses, load_json, versus

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
            f"{reg['two_stage']['trained_qa']:.1%} (means over seeds {results['seeds']}). Allen-Zhu & Li report "
            "86.6% vs 9.7% on held-out people (GPT-2-sized models trained from scratch, far larger budgets). "
            + versus(reg["mixed"]["heldout_qa"], reg["two_stage"]["heldout_qa"], "mixed > two-stage on held-out QA"),
        )
    ]
    curves = go.Figure()
    seed_dir = _seed_dir(results, run)
    for regime in ("two_stage", "mixed"):
        hist = load_json(seed_dir / regime / "history.json", list) or []
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
    results = load_json(run / "results.json")
    if results is None:
        raise FileNotFoundError(f"{run / 'results.json'} does not exist: run `python -m mechrecall reproduce` first")
    if not isinstance(results.get("regimes"), dict):
        raise ValueError(f"{run / 'results.json'}: not a reproduce result (no 'regimes' table)")
    loaded = [(a, a.load(run)) for a in analyses()]
    figs = _recall_figures(results, run)
    for analysis, result in loaded:
        if result is None:
            continue
        try:
            figs += analysis.captioned(result)
        except KeyError as e:  # a result file from an older version (keys renamed since): say which, not just the key
            raise ValueError(
                f"{run / analysis.output}: lacks the key {e} (written by an older version of mechrecall?): rerun the "
                f"{analysis.name} analysis (python -m mechrecall reproduce with --force redoes all)"
            ) from None

    parts = _recall_section(results)
    parts.append(
        f"<h2>Figures</h2><p>Analyses of one pair, seed {results.get('seed', results['seeds'][0])}'s; the recall "
        f"tables above are means over seeds {results['seeds']}.</p>"
    )
    for i, (fig, caption) in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}"))
        parts.append(f"<p class='caption'>{_html.escape(caption)}</p>")

    parts.append(_provenance(results, run, {a.name: r for a, r in loaded}.get("masks")))
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
