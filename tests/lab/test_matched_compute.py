"""analyses/matched_compute.py: pre-instruction against mixed at matched steps and rows (plumbing, tiny budgets)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mixed_runs_get_the_steps_and_rows_pre_instruction_took(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "analyses"))
    import matched_compute as mc

    shrink = ["pre_instruction.qa.steps=6", "pre_instruction.qa.batch_query=8", "pre_instruction.joint.steps=8",
              "pre_instruction.joint.batch_storage=8", "pre_instruction.joint.batch_query=8", "mixed.batch_storage=8",
              "mixed.batch_query=8", "two_stage.stage1.steps=4", "two_stage.stage1.batch_storage=8",
              "two_stage.stage2.steps=4", "two_stage.stage2.batch_query=8", "data.n_people=40"]  # fmt: skip
    argv = ["--out", str(tmp_path / "m"), "--seeds", "1"] + [a for s in shrink for a in ("--set", s)]
    assert mc.main(argv) == 0
    result = json.loads((tmp_path / "m" / "matched.json").read_text())
    runs = result["runs"]["1"]
    assert runs["pre-instruction"]["steps"] == 14 and runs["pre-instruction"]["rows"] == 6 * 8 + 8 * 16
    assert runs["mixed-matched-steps"]["steps"] == 14
    assert runs["mixed-matched-rows"]["steps"] == 11 and runs["mixed-matched-rows"]["rows"] == 176
    d = result["pre_instruction_minus"]["mixed-matched-steps"]["heldout_qa"]
    assert d["per_seed"] == [
        pytest.approx(runs["pre-instruction"]["heldout_qa"] - runs["mixed-matched-steps"]["heldout_qa"])
    ]
    assert "pre-instruction - mixed-matched-rows" in capsys.readouterr().out
    # a second call reuses every finished run (nothing retrained: result.json files are read back)
    stamp = (tmp_path / "m" / "seed-1" / "pre-instruction" / "result.json").stat().st_mtime_ns
    assert mc.main(argv) == 0
    assert (tmp_path / "m" / "seed-1" / "pre-instruction" / "result.json").stat().st_mtime_ns == stamp
    # a run that finished training but was stopped before its result.json: counted again from its checkpoints
    (tmp_path / "m" / "seed-1" / "pre-instruction" / "result.json").unlink()
    assert mc.main(argv) == 0
    again = json.loads((tmp_path / "m" / "matched.json").read_text())["runs"]["1"]["pre-instruction"]
    assert (again["steps"], again["rows"]) == (14, 6 * 8 + 8 * 16)

    # --mechanism: the same runs reused, a two-stage run added, the pairs analysed (the consistency analysis alone at
    # tiny sizes here; every measure's reader is checked against a full reproduce's JSONs below)
    import mechrecall.report.analysis as analysis

    consistency = analysis.get_analysis("consistency")
    monkeypatch.setattr(analysis, "analyses", lambda: [consistency])
    tiny = {"n_people": 8, "grad_facts": 8, "parity": False}
    monkeypatch.setattr(analysis.Analysis, "sizes", lambda self, context: tiny)
    monkeypatch.setattr(mc, "MEASURES", {k: v for k, v in mc.MEASURES.items() if v[0] == "consistency.json"})
    argv = [*argv, "--mechanism"]
    assert mc.main(argv) == 0
    mech = json.loads((tmp_path / "m" / "mechanism.json").read_text())
    values = mech["values"]["1"]
    assert set(values) == {"two-stage", "pre-instruction", "mixed-matched-steps", "mixed-matched-rows"}
    runs = json.loads((tmp_path / "m" / "matched.json").read_text())["runs"]["1"]
    assert runs["two-stage"]["steps"] == 8
    pair = tmp_path / "m" / "seed-1" / "analyses" / "two-stage--pre-instruction"
    g = json.loads((pair / "consistency.json").read_text())["gradient"]["pre-instruction"]
    assert values["pre-instruction"]["gradient_margin"] == pytest.approx(
        g["same_fact_mean_cos"] - g["baseline_mean_cos"]
    )
    assert set(mech["summary"]) == {"gradient_margin", "representation_margin_final"}
    for m, d in mech["summary"].items():
        v = [values[n][m] for n in mc.ORDER]
        assert d["order_holds_per_seed"] == [v[0] < v[1] < v[2]]
        assert d["pre_instruction_minus"]["mixed-matched-rows"] == [
            pytest.approx(values["pre-instruction"][m] - values["mixed-matched-rows"][m])
        ]
    # an analysed pair is not analysed again
    stamp = (pair / "done.json").stat().st_mtime_ns
    assert mc.main(argv) == 0
    assert (pair / "done.json").stat().st_mtime_ns == stamp


def test_every_measure_reads_a_full_reproduce(micro_run):
    """Each of MEASURES reads its analysis' JSON as reproduce writes it, for both models of the pair."""
    import math

    sys.path.insert(0, str(ROOT / "analyses"))
    import matched_compute as mc

    out, _ = micro_run
    for name, (file, get) in mc.MEASURES.items():
        j = json.loads((out / file).read_text())
        for label in ("two_stage", "mixed"):
            assert math.isfinite(get(j, label)), (name, label)
