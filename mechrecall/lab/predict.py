"""Does early consistency predict generalization? Rank correlations over a grid of runs, with bootstrap intervals.

A grid is a table with one row per training run: predictors measured early (gradient / representation consistency
on the validation people at 10 % and 25 % of the budget, and the baselines: training loss and trained QA at the same
points) and the target, the run's final held-out QA. :func:`compare_predictors` gives each predictor's Spearman
correlation with the target and a percentile bootstrap interval over runs (runs resampled with replacement; the
same resamples for every predictor, so their intervals are comparable), plus, against a baseline, the bootstrap
distribution of the difference in |rho|.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["PredictorResult", "compare_predictors", "rank", "spearman"]


def rank(values: npt.ArrayLike) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Spearman's rho: Pearson correlation of the ranks (NaN when either side is constant)."""
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


@dataclass
class PredictorResult:
    predictor: str
    rho: float
    ci: tuple[float, float]
    n_runs: int
    better_than: dict[str, tuple[float, tuple[float, float]]]  # baseline -> (|rho| - |rho_b|, its interval)

    def to_dict(self) -> dict:
        return {"predictor": self.predictor, "rho": self.rho, "ci": list(self.ci), "n_runs": self.n_runs,
                "abs_rho_minus_baseline": {b: {"diff": d, "ci": list(c)} for b, (d, c) in self.better_than.items()}}  # fmt: skip


def compare_predictors(
    grid: pd.DataFrame | Mapping[str, npt.ArrayLike],
    target: str,
    predictors: Sequence[str],
    baselines: Sequence[str] = (),
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[PredictorResult]:
    """Spearman rho of each of ``predictors`` and ``baselines`` (columns of ``grid``) with ``target``, a bootstrap
    interval over runs, and for each predictor the difference ``|rho| - |rho_baseline|`` with its interval."""
    df = pd.DataFrame(grid)
    missing = [c for c in (target, *predictors, *baselines) if c not in df.columns]
    if missing:
        raise KeyError(f"the grid has no column(s) {missing} (it has {list(df.columns)})")
    n = len(df)
    if n < 4:
        raise ValueError(f"a rank correlation over {n} runs says nothing: need at least 4")
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, n, size=(n_boot, n))
    y = df[target].to_numpy(float)
    names = list(dict.fromkeys([*predictors, *baselines]))
    point = {c: spearman(df[c].to_numpy(float), y) for c in names}
    boots = {c: np.array([spearman(df[c].to_numpy(float)[s], y[s]) for s in samples]) for c in names}
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def interval(values: np.ndarray) -> tuple[float, float]:
        ok = values[~np.isnan(values)]
        return (float(np.quantile(ok, lo_q)), float(np.quantile(ok, hi_q))) if len(ok) else (float("nan"),) * 2

    out = []
    for c in names:
        better = {}
        if c in predictors:
            for b in baselines:
                if b != c:
                    diff = np.abs(boots[c]) - np.abs(boots[b])
                    better[b] = (abs(point[c]) - abs(point[b]), interval(diff))
        out.append(PredictorResult(c, point[c], interval(boots[c]), n, better))
    return out
