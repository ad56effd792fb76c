"""Choosing a budget or a learning rate reads the validation people only, by a fixed rule."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mechrecall.lab.select import VISIBLE, choose, read_history, validation_view

ROOT = Path(__file__).resolve().parents[2]


def _h(step, trained, val, nll, heldout=0.5, stage="mixed"):
    return {"stage": stage, "step": step, "global_step": step, "trained_qa": trained, "validation_qa": val,
            "validation_qa_nll": nll, "heldout_qa": heldout, "heldout_qa_nll": 1.0, "storage": 0.9,
            "loss_query": 0.1, "per_attribute": {"heldout_qa": {}}}  # fmt: skip


def test_the_view_never_holds_a_held_out_column():
    view = validation_view([_h(50, 0.5, 0.1, 3.0), {"stage": "stage1", "step": 10, "storage": 0.3}])
    assert len(view) == 1  # the storage-only evaluation has no validation QA
    assert not [c for c in view.columns if "heldout" in c or c == "per_attribute"]
    assert set(view.columns) <= set(VISIBLE) | {"loss_query"}


def test_the_rule_takes_the_best_validation_among_learnt_steps_and_breaks_ties_by_nll():
    h = [_h(50, 0.80, 0.20, 2.0), _h(100, 0.96, 0.05, 3.0), _h(150, 0.97, 0.05, 2.5), _h(200, 0.99, 0.05, 2.5)]
    c = choose([h])
    assert (c.step, c.qualified) == (150, True)  # 50 has more validation QA but has not learnt the trained half
    # held-out numbers cannot move the choice: make the chosen step's held-out QA the worst
    h2 = [dict(r, heldout_qa=1.0 - r["step"] / 1000) for r in h]
    assert choose([h2]).step == 150
    assert choose([h], min_trained=0.0).step == 50
    nothing = [_h(50, 0.5, 0.3, 2.0), _h(100, 0.6, 0.1, 1.0)]
    c = choose([nothing])
    assert (c.step, c.qualified) == (100, False)  # no step learnt the trained half: the cap


def test_multi_stage_histories_need_a_stage_and_are_ordered_by_global_step():
    h = [_h(100, 0.5, 0.1, 2.0, stage="qa"), _h(200, 0.6, 0.1, 2.0, stage="qa"),
         {**_h(100, 0.7, 0.1, 2.0, stage="joint"), "global_step": 300}]  # fmt: skip
    with pytest.raises(ValueError, match="several stages"):
        choose([h])
    c = choose([h], stage="joint")
    assert (c.stage, c.step, c.global_step, c.qualified) == ("joint", 100, 300, False)
    two = [_h(100, 0.97, 0.1, 2.0, stage="stage2"), {**_h(50, 0.97, 0.1, 2.0, stage="stage2"), "global_step": 350}]
    assert choose([two]).global_step == 100  # a tie goes to the earlier global step


def test_old_histories_without_nll_and_empty_validation_splits():
    old = [
        {k: v for k, v in _h(s, 0.96, v, 0.0).items() if k != "validation_qa_nll"} for s, v in ((50, 0.1), (100, 0.1))
    ]
    c = choose([old])
    assert (c.step, c.validation_qa_nll) == (50, None)
    nan = [_h(50, 0.96, float("nan"), float("nan")), _h(100, 0.96, 0.0, 3.0)]
    assert len(validation_view(nan)) == 1 and choose([nan]).step == 100


def test_learning_rate_probes_are_compared_at_equal_steps():
    slow = [_h(50, 0.1, 0.0, 4.0), _h(150, 0.3, 0.0, 3.1)]
    fast = [_h(50, 0.2, 0.0, 3.5), _h(150, 0.4, 0.0, 3.4)]
    c = choose([slow, fast], min_trained=0.0, at_step=150)
    assert (c.run, c.step) == (0, 150)  # equal validation QA: the lower NLL wins
    with pytest.raises(ValueError, match="at step 999"):
        choose([slow], at_step=999)


def test_cli_prints_no_held_out_number_and_refuses_bad_files_in_one_line(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps([_h(50, 0.96, 0.1, 2.0, heldout=0.123456), _h(100, 0.97, 0.2, 2.0, heldout=0.654321)]))
    out = tmp_path / "choice.json"
    script = [sys.executable, str(ROOT / "analyses" / "choose_budget.py")]
    r = subprocess.run([*script, str(path), "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "heldout" not in r.stdout and "0.123" not in r.stdout and "0.654" not in r.stdout
    assert "step 100" in r.stdout and json.loads(out.read_text())["step"] == 100
    old = tmp_path / "old.json"  # a history from before the answer NLL: valid JSON out (null, not Infinity)
    old.write_text(json.dumps([{k: v for k, v in _h(50, 0.96, 0.1, 2.0).items() if k != "validation_qa_nll"}]))
    r = subprocess.run([*script, str(old), "--json", str(out)], capture_output=True, text=True)
    assert (
        r.returncode == 0
        and "Infinity" not in out.read_text()
        and json.loads(out.read_text())["validation_qa_nll"] is None
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run([*script, str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "bad.json" in r.stderr
    # a folder that is a file: one line, exit 2
    r = subprocess.run([*script, str(path), "--json", str(path / "c.json")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--json" in r.stderr
    with pytest.raises(ValueError, match="no such history"):
        read_history(tmp_path / "missing.json")
