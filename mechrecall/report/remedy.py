"""Consistency-aware objectives on the report page: ``remedy.json``, written by ``analyses/remedy.py`` beside a run."""

from __future__ import annotations

from mechrecall.report.analysis import Analysis

__all__ = ["captioned", "ANALYSIS"]


def captioned(remedy: dict) -> list[tuple]:
    """Validation and held-out QA of every objective family's chosen variant, against plain two-stage and mixed."""
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
    caption = (f"Consistency-aware objectives (analyses/remedy.py, preset {remedy['preset']}, means over seeds "
               f"{seeds}): each family's variant chosen by validation QA at seed 0 ({remedy['chosen']}); share of the "
               f"two-stage-to-mixed held-out gap it closes: {closed}; held-out QA against plain mixed: {over}. Every "
               f"variant tried is in remedy.json. All at the preset's step budgets (equal steps): a gain at equal steps "
               f"may be faster convergence rather than a higher ceiling (analyses/remedy.py --converge tests that).")  # fmt: skip
    return [(fig, caption)]


ANALYSIS = Analysis(name="remedy", output="remedy.json", order=70, captioned=captioned, beside=True)
