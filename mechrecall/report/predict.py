"""Early prediction of generalization on the report page: ``predict.json``, written by
``analyses/predict_generalization.py`` beside a run."""

from __future__ import annotations

from mechrecall.report.analysis import Analysis

__all__ = ["captioned", "ANALYSIS"]


def captioned(predict: dict) -> list[tuple]:
    """Spearman correlations of each early measure with the runs' final held-out QA, with their intervals."""
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
    caption = ("Early prediction (analyses/predict_generalization.py): Spearman correlation of each measure at a fixed "
               "fraction of a run's budget with the run's final held-out QA, with 95 % bootstrap intervals over runs "
               "(the permutation p-values, Holm-corrected, are in predict.json); consistency and the validation-QA "
               "baselines are measured on the validation people at the same checkpoint.")  # fmt: skip
    return [(fig, caption)]


ANALYSIS = Analysis(name="predict", output="predict.json", order=60, captioned=captioned, beside=True)
