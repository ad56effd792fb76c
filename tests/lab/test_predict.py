"""The prediction analysis' statistics on hand-made grids with known answers."""

import numpy as np
import pandas as pd
import pytest

from mechrecall.lab.predict import compare_predictors, rank, spearman


def test_ranks_share_ties():
    assert rank([10, 30, 20, 30]).tolist() == [1.0, 3.5, 2.0, 3.5]


def test_spearman_known_values():
    # ranks of y: 2 1 4 3 5.5 5.5; centred cross-product 15 over sqrt(17.5 * 17) (worked by hand)
    x, y = [1, 2, 3, 4, 5, 6], [2.0, 1.0, 4.0, 3.0, 6.0, 6.0]
    assert spearman(x, y) == pytest.approx(15 / np.sqrt(17.5 * 17))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))


def test_a_monotone_predictor_beats_a_noisy_baseline_on_a_hand_made_grid():
    rng = np.random.default_rng(0)
    heldout = np.linspace(0.05, 0.7, 12)
    grid = pd.DataFrame({
        "heldout_qa": heldout,
        "grad_cos_10pct": heldout ** 2 + 0.01,       # monotone in the target: rho = 1
        "train_loss_10pct": rng.permutation(12),    # unrelated
        "trained_qa_10pct": -heldout,               # perfectly anti-monotone: |rho| = 1 too
    })  # fmt: skip
    res = {r.predictor: r for r in compare_predictors(grid, "heldout_qa", ["grad_cos_10pct"],
                                                      ["train_loss_10pct", "trained_qa_10pct"], n_boot=500)}  # fmt: skip
    assert res["grad_cos_10pct"].rho == pytest.approx(1.0) and res["grad_cos_10pct"].ci == (1.0, 1.0)
    assert res["trained_qa_10pct"].rho == pytest.approx(-1.0)
    noisy = res["train_loss_10pct"]
    assert noisy.rho == pytest.approx(spearman(grid["train_loss_10pct"], heldout))
    assert noisy.ci[0] < noisy.rho < noisy.ci[1]
    diff, ci = res["grad_cos_10pct"].better_than["train_loss_10pct"]
    assert diff == pytest.approx(1 - abs(noisy.rho)) and ci[0] <= diff <= ci[1]
    assert res["grad_cos_10pct"].better_than["trained_qa_10pct"][0] == pytest.approx(0.0)


def test_a_grid_too_small_or_missing_a_column_is_refused():
    with pytest.raises(ValueError, match="over 3 runs"):
        compare_predictors({"y": [1, 2, 3], "x": [1, 2, 3]}, "y", ["x"])
    with pytest.raises(KeyError, match=r"no column\(s\) \['z'\]"):
        compare_predictors({"y": [1, 2, 3, 4], "x": [1, 2, 3, 4]}, "y", ["z"])


def test_within_regime_correlations_only_for_regimes_with_enough_runs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analyses"))
    import predict_generalization as pg

    def row(regime, i, heldout):
        at = {**{p: heldout + 0.01 * i for p in pg.PREDICTORS}, "train_loss": 1.0 - heldout, "trained_qa": 0.5}
        return {"regime": regime, "final": {"heldout_qa": heldout}, "at": {"0.1": at}}

    rows = [row("mixed", i, 0.1 * i) for i in range(6)] + [row("two_stage", i, 0.05 * i) for i in range(3)]
    within = pg.analyse_within(rows, [0.1], n_boot=100)
    assert list(within) == ["mixed"]  # two_stage has 3 runs: no correlation claimed
    res = {r["predictor"]: r for r in within["mixed"]["0.1"]}
    assert res["grad_margin"]["rho"] == pytest.approx(1.0) and res["train_loss"]["rho"] == pytest.approx(-1.0)
