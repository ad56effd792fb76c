"""Does early consistency predict generalization? Rank correlations over a grid of runs, with permutation tests.

A grid is a table with one row per training run: predictors measured early (gradient / representation consistency
on the validation people at fixed fractions of the budget, and baselines measured at the same checkpoint: validation
QA and its answer NLL, training loss, trained QA) and the target, the run's final held-out QA.
:func:`compare_predictors` gives each column's Spearman correlation with the target, a two-sided permutation p-value
(the target shuffled over runs), a percentile bootstrap interval over runs (runs resampled with replacement; the same
resamples for every column, so intervals are comparable; a resample in which a column is constant has no rho and is
dropped, and how many were is reported), and for each predictor the bootstrap interval of ``|rho| - |rho_baseline|``
(a baseline that is constant, in the data or in a resample, predicts nothing: its |rho| counts as 0 there).
:func:`holm` corrects a family of p-values for multiple comparisons (Holm's step-down, which controls the family-wise
error rate without assuming independence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["PredictorResult", "compare_predictors", "holm", "holm_adjust", "rank", "spearman"]


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
    # baseline -> (|rho| - |rho_b|, its interval at ``diff_level``, resamples dropped: predictor or target constant)
    better_than: dict[str, tuple[float, tuple[float, float], int]]
    p: float = float("nan")  # two-sided permutation p-value of rho
    boot_dropped: int = 0  # bootstrap resamples without a rho (the column or the target constant), left out

    def to_dict(self) -> dict:
        return {"predictor": self.predictor, "rho": self.rho, "ci": list(self.ci), "n_runs": self.n_runs,
                "p": self.p, "boot_dropped": self.boot_dropped,
                "abs_rho_minus_baseline": {b: {"diff": d, "ci": list(c), "dropped": k}
                                           for b, (d, c, k) in self.better_than.items()}}  # fmt: skip


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN and is not counted in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))  # step-down: adjusted p never decreases with rank
        out[idx] = running
    return out


def holm_adjust(tables: Mapping[str, list[dict]]) -> None:
    """Adds ``p_holm`` to every row of ``{key: [PredictorResult.to_dict(), ...]}``, the rows taken as one family."""
    rows = [r for table in tables.values() for r in table]
    for r, adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
        r["p_holm"] = float(adj)


def compare_predictors(
    grid: pd.DataFrame | Mapping[str, npt.ArrayLike],
    target: str,
    predictors: Sequence[str],
    baselines: Sequence[str] = (),
    *,
    n_boot: int = 2000,
    n_perm: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    diff_level: float | None = None,
) -> list[PredictorResult]:
    """Spearman rho of each of ``predictors`` and ``baselines`` (columns of ``grid``) with ``target``, its permutation
    p-value, a bootstrap interval over runs at ``level``, and for each predictor ``|rho| - |rho_baseline|`` with its
    interval at ``diff_level`` (default ``level``; raise it to correct a family of such comparisons, Bonferroni)."""
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
    # one set of target shuffles for every column; ranks once, then each shuffle is a dot product
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    ry = rank(y) - rank(y).mean()
    pvalue = {}
    for c in names:
        rx = rank(df[c].to_numpy(float))
        rx -= rx.mean()
        denom = np.sqrt((rx**2).sum() * (ry**2).sum())
        if denom == 0:
            pvalue[c] = float("nan")
            continue
        null = np.abs(ry[perms] @ rx) / denom
        pvalue[c] = float((1 + (null >= abs(point[c]) - 1e-12).sum()) / (1 + n_perm))

    def interval(values: np.ndarray, at: float = level) -> tuple[float, float]:
        ok = values[~np.isnan(values)]
        lo_q, hi_q = (1 - at) / 2, 1 - (1 - at) / 2
        return (float(np.quantile(ok, lo_q)), float(np.quantile(ok, hi_q))) if len(ok) else (float("nan"),) * 2

    out = []
    for c in names:
        better = {}
        if c in predictors:
            for b in baselines:
                if b != c:
                    # NaN |rho| of the baseline is a constant baseline: it ranks nothing, so it counts as 0
                    diff = np.abs(boots[c]) - np.nan_to_num(np.abs(boots[b]), nan=0.0)
                    point_diff = abs(point[c]) - (0.0 if np.isnan(point[b]) else abs(point[b]))
                    better[b] = (point_diff, interval(diff, diff_level or level), int(np.isnan(diff).sum()))
        out.append(
            PredictorResult(c, point[c], interval(boots[c]), n, better, pvalue[c], int(np.isnan(boots[c]).sum()))
        )
    return out
