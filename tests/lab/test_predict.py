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
    diff, ci, dropped = res["grad_cos_10pct"].better_than["train_loss_10pct"]
    assert dropped == 0  # nothing constant in any resample of 12 distinct values
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
        at = {
            **{p: heldout + 0.01 * i for p in pg.PREDICTORS},
            "train_loss": 1.0 - heldout,
            "trained_qa": 0.5,
            "validation_qa": 0.0,
            "validation_qa_nll": 5.0 - heldout,
        }
        return {"regime": regime, "final": {"heldout_qa": heldout}, "at": {"0.1": at}}

    rows = [row("mixed", i, 0.1 * i) for i in range(6)] + [row("two_stage", i, 0.05 * i) for i in range(3)]
    within = pg.analyse_within(rows, [0.1], n_boot=100)
    assert list(within) == ["mixed"]  # two_stage has 3 runs: no correlation claimed
    res = {r["predictor"]: r for r in within["mixed"]["0.1"]}
    assert res["grad_margin"]["rho"] == pytest.approx(1.0) and res["train_loss"]["rho"] == pytest.approx(-1.0)
    assert res["validation_qa"]["p"] != res["validation_qa"]["p"]  # constant column: no rho, no p (NaN)
    # six runs, a perfect rank order: p = 2/720 exactly, Monte Carlo ~0.003; Holm multiplies by the family's size
    assert res["grad_margin"]["p"] < 0.01 and res["grad_margin"]["p_holm"] >= res["grad_margin"]["p"]
    # a constant baseline ranks nothing: its |rho| counts as 0, so grad_margin's margin over it is 1
    assert res["grad_margin"]["abs_rho_minus_baseline"]["validation_qa"]["diff"] == pytest.approx(1.0)
    # but grad_margin ties validation QA's NLL (|rho| = 1 both): not "better than validation QA"
    assert res["grad_margin"]["abs_rho_minus_baseline"]["validation_qa_nll"]["diff"] == pytest.approx(0.0)
    assert pg.verdict(within["mixed"]) == {"0.1": []}


def test_verdict_names_a_measure_that_beats_both_validation_baselines():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analyses"))
    import predict_generalization as pg

    rng = np.random.default_rng(1)
    rows = []
    for i in range(16):  # grad_margin ranks the target exactly; the validation baselines are noise or constant
        at = {"grad_margin": i, "rep_subject_margin": rng.random(), "rep_final_margin": rng.random(),
              "validation_qa": 0.0, "validation_qa_nll": rng.random(), "train_loss": rng.random(),
              "trained_qa": rng.random()}  # fmt: skip
        rows.append({"regime": "mixed", "final": {"heldout_qa": i / 20}, "at": {"0.1": at}})
    correlations = pg.analyse(rows, [0.1], n_boot=500)
    assert pg.verdict(correlations) == {"0.1": ["grad_margin"]}


def test_the_grid_is_sixteen_independent_runs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analyses"))
    import predict_generalization as pg

    seeds = [next(o for o in overrides if o.startswith("seed=")) for _, overrides in pg.GRID.values()]
    regimes = [regime for regime, _ in pg.GRID.values()]
    assert len(pg.GRID) == 16 and len(set(seeds)) == 16  # no two runs share data, initialisation or a checkpoint
    assert regimes.count("mixed") == regimes.count("two_stage") == 8


def test_a_shrunken_grid_runs_end_to_end(tmp_path, capsys):
    """Four runs of a few small steps each through the CLI's main: every checkpoint measure and the statistics are
    written (in-process: the script's plumbing, not its science)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analyses"))
    import predict_generalization as pg

    names = [n for n in pg.GRID if n.startswith("mixed")][:2] + [n for n in pg.GRID if n.startswith("two")][:2]
    shrink = ["mixed.steps=12", "mixed.batch_storage=8", "two_stage.stage1.steps=6", "two_stage.stage1.batch_storage=8",
              "two_stage.stage2.steps=6", "two_stage.stage2.batch_query=8", "data.n_people=40"]  # fmt: skip
    argv = ["--out", str(tmp_path / "p"), "--runs", *names, "--grad-facts", "4", "--boot", "50"]
    assert pg.main(argv + [a for s in shrink for a in ("--set", s)]) == 0
    result = json.loads((tmp_path / "p" / "predict.json").read_text())
    assert [r["name"] for r in result["runs"]] == names
    assert {r["at"]["0.25"]["step"] for r in result["runs"]} == {3}  # 25 % of 12 steps in both regimes
    for row in result["runs"]:
        assert set(row["at"]["0.1"]) >= {*pg.PREDICTORS, *pg.BASELINES}
    table = result["correlations"]["0.1"]
    assert {r["predictor"] for r in table} == {*pg.PREDICTORS, *pg.BASELINES}
    assert all("p_holm" in r and "boot_dropped" in r for r in table)
    assert set(result["better_than_validation_qa"]) == {"0.1", "0.25"}
    assert "better than validation QA" in capsys.readouterr().out


def test_permutation_p_matches_exact_enumeration_and_boot_drops_are_counted():
    from itertools import permutations

    x, y = [0.3, 0.1, 0.5, 0.2, 0.9, 0.4], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    rho = spearman(x, y)
    exact = np.mean([abs(spearman(x, list(p))) >= abs(rho) - 1e-12 for p in permutations(y)])  # all 720 orders
    (res,) = compare_predictors({"y": y, "x": x}, "y", ["x"], n_boot=200, n_perm=20000)
    assert res.p == pytest.approx(exact, abs=0.01)  # Monte Carlo error at 20,000 shuffles is ~0.003
    (mono,) = compare_predictors({"y": np.arange(8.0), "x": np.arange(8.0) ** 2}, "y", ["x"], n_boot=200)
    assert mono.p < 1e-3  # 2 of 8! orders are as extreme
    # with 4 runs, some resamples repeat one run four times: x constant, no rho; they are counted, not hidden
    (small,) = compare_predictors({"y": [1.0, 2, 3, 4], "x": [1.0, 3, 2, 4]}, "y", ["x"], n_boot=400)
    assert 0 < small.boot_dropped < 400


def test_holm_adjusts_a_family_by_hand():
    from mechrecall.lab.predict import holm, holm_adjust

    # sorted 0.01, 0.03, 0.04: x3 = 0.03, x2 = 0.06, x1 = 0.04 -> 0.06 (never below the previous)
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(adjusted[3])
    tables = {"0.1": [{"p": 0.01}, {"p": 0.04}], "0.25": [{"p": 0.03}]}
    holm_adjust(tables)
    assert [r["p_holm"] for t in tables.values() for r in t] == pytest.approx([0.03, 0.06, 0.06])
