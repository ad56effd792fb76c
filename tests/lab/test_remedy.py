"""analyses/remedy.py --converge: the chosen variants and their baselines to convergence (plumbing, tiny budgets)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_converge_runs_pairs_to_their_stop_rules_and_reports_both_gains(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "analyses"))
    import remedy as rm

    shrink = ["mixed.steps=3", "mixed.eval_every=3", "mixed.batch_storage=8", "mixed.batch_query=8",
              "two_stage.stage1.steps=4", "two_stage.stage1.batch_storage=8", "two_stage.stage2.steps=2",
              "two_stage.stage2.eval_every=4", "two_stage.stage2.batch_query=8", "data.n_people=40"]  # fmt: skip
    argv = ["--out", str(tmp_path / "r"), "--converge", "--seeds", "3"] + [a for s in shrink for a in ("--set", s)]
    assert rm.main(argv) == 0
    result = json.loads((tmp_path / "r" / "converge.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"mixed", "mixed+con-w1", "two-stage", "two-stage+con-w10"}
    for name in ("mixed", "mixed+con-w1"):  # 4 x 3 steps, read every 3: 4 evaluations, a plateau needs 4
        assert runs[name]["global_step"] == 12
    for name in ("two-stage", "two-stage+con-w10"):  # stage 1's 4 steps, then at most 4 x 2 steps of stage 2
        assert 4 < runs[name]["global_step"] <= 12
    gain = result["gain_at_convergence"]["mixed+con-w1"]
    assert gain["per_seed"] == [pytest.approx(runs["mixed+con-w1"]["heldout_qa"] - runs["mixed"]["heldout_qa"])]
    assert result["gain_at_equal_steps"]["mixed+con-w1 s3"]  # held-out QA compared at the steps both runs evaluated
    assert "at convergence" in capsys.readouterr().out
