"""Grafting variants (mechrecall.report.grafting, analyses/grafting.py) on the micro reproduce: the plumbing is exact
(a donor grafted into itself changes nothing; a graft changes only masked entries), controls are size-matched, and
bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechrecall.interventions import graft
from mechrecall.report.grafting import _masks, transfers

ROOT = Path(__file__).resolve().parents[2]


def test_transfer_needs_a_margin_over_the_random_controls():
    assert transfers(0.30, 0.10, 0.01)
    assert not transfers(0.13, 0.10, 0.01)  # under 5 points
    assert not transfers(0.30, 0.10, 0.15)  # inside 2 sd of the draws


def test_trace_masks_split_into_shared_and_format_only_sets():
    from mechrecall.lab.trace import GradientTrace

    g = torch.Generator().manual_seed(0)
    sums = {kind: {f: {"model.layers.0.mlp.up_proj.weight": torch.rand(8, 8, generator=g)} for f in ("storage", "query")}
            for kind in ("abs_grad", "grad_x_update")}  # fmt: skip
    trace = GradientTrace(sums=sums, steps={"storage": 1, "query": 1})
    ms = _masks("trace:abs_grad", 0.25, trace, {}, "per_matrix")
    name = "model.layers.0.mlp.up_proj.weight"
    shared, s_only, q_only = ms["mask"][name], ms["storage_only"][name], ms["query_only"][name]
    assert not (shared & s_only).any() and not (shared & q_only).any() and not (s_only & q_only).any()
    assert int((shared | s_only).sum()) == 16 == int((shared | q_only).sum())  # each format's top 25 % of 64
    target, donor = {name: torch.zeros(8, 8)}, {name: torch.ones(8, 8)}
    assert torch.equal(graft(target, donor, ms["mask"])[name].bool(), shared)


@pytest.fixture(scope="module")
def grafting_json(micro_run, tmp_path_factory):
    run, reg = micro_run
    out = tmp_path_factory.mktemp("graft")
    cmd = [sys.executable, str(ROOT / "analyses" / "grafting.py"), "--family", "micro-s0", "--registry", str(reg),
           "--recipients", "two_stage=micro-s0-two-stage", "stage1=micro-s0-two-stage-stage1", "self=micro-s0-mixed",
           "--ks", "0.01", "1.0", "--draws", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plotly" in (out / "grafting.html").read_text()
    return json.loads((out / "grafting.json").read_text())


def test_grafting_every_variant_and_control(grafting_json):
    res = grafting_json
    donor = res["donor_recall"]["heldout"]
    assert set(res["recipients"]) == {"two_stage", "stage1", "self"}
    for label, e in res["recipients"].items():
        assert {(r["source"], r["k"]) for r in e["rows"]} == {(s, k) for s in res["sources"] for k in (0.01, 1.0)}
        for r in e["rows"]:
            assert 0 < r["fraction"] <= 1 and r["n"] > 0
            if r["source"].startswith("trace:"):  # at k = 1 both formats take everything: no format-only entries
                assert (r["storage_only_n"] > 0 and r["query_only_n"] > 0) == (r["k"] < 1) and "query_only_heldout" in r
            if label == "self":  # the donor grafted into itself: nothing changes, masks or random controls
                assert r["heldout_after"] == donor == r["random_heldout_mean"]
    # at k = 1 the update mask covers every ranked matrix: fraction 1, and a random control of that size is the mask
    full = [r for r in res["recipients"]["two_stage"]["rows"] if r["source"] == "update" and r["k"] == 1.0][0]
    assert full["fraction"] == 1.0 and full["heldout_after"] == full["random_heldout_mean"]
    # every parameter of the donor grafted is the donor itself
    everything = [r for r in res["recipients"]["two_stage"]["rows"] if r["source"] == "update:all" and r["k"] == 1.0]
    assert everything[0]["heldout_after"] == donor
    assert isinstance(res["any_transfer"], bool) and set(res["best"]) == set(res["recipients"])


def test_grafting_refuses_bad_recipients_in_one_line(micro_run, tmp_path):
    _, reg = micro_run
    cmd = [sys.executable, str(ROOT / "analyses" / "grafting.py"), "--family", "micro-s0", "--registry", str(reg),
           "--recipients", "no-equals-sign", "--out", str(tmp_path / "x")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "LABEL=CHECKPOINT" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_report_page_shows_grafting_prediction_and_remedy_results(micro_run, grafting_json, tmp_path):
    """The beyond-the-paper results join the report when their JSON sits beside the run (as the documented commands put them).
    Prediction and remedy rows are hand-made here (their analyses train grids); their shapes come from the scripts'
    own functions."""
    import shutil

    from mechrecall.io import atomic_write_json
    from mechrecall.report.browser import check_page, find_chromium
    from mechrecall.report.page import build

    sys.path.insert(0, str(ROOT / "analyses"))
    import predict_generalization as pg
    import remedy as rm

    run, _ = micro_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    atomic_write_json(copy / "grafting" / "grafting.json", grafting_json)
    rows = [{"name": f"r{i}", "final": {"heldout_qa": i / 10},
             "at": {"0.1": {**{p: i * 0.1 + (i % 3) * 0.01 for p in pg.PREDICTORS}, "train_loss": 3.0 - i * 0.2,
                            "trained_qa": (i * 7 % 5) / 5, "validation_qa": (i * 3 % 4) / 4,
                            "validation_qa_nll": 9.0 - i}}} for i in range(6)]  # fmt: skip
    atomic_write_json(copy / "predict" / "predict.json", {"runs": rows, "correlations": pg.analyse(rows, [0.1], 200)})
    runs = [{"name": n, "seed": s, **dict.fromkeys(rm.METRICS, v + s / 100)}
            for n, v in (("two-stage", 0.1), ("mixed", 0.3), ("two-stage+cos-w1", 0.2)) for s in (0, 1)]  # fmt: skip
    stats = rm.summarize(runs, ["two-stage", "mixed", "two-stage+cos-w1"])
    assert rm.gap_closed(stats, "two-stage+cos-w1") == pytest.approx(0.5)
    atomic_write_json(copy / "remedy" / "remedy.json", {"preset": "micro", "seeds": [0, 1], "stats": stats,
                                                       "chosen": rm.choose(runs), "gap_closed": {"x": 0.5},
                                                       "over_mixed": {"x": 0.1}})  # fmt: skip
    page = build(copy).read_text()
    for caption in ("Grafting, every protocol variant", "Early prediction", "Consistency-aware objectives",
                    "x: +10.0 points"):  # fmt: skip
        assert caption in page
    if find_chromium() is not None:
        check = check_page(copy / "report.html")
        assert check["errors"] == [] and check["empty"] == []


def test_remedy_chooses_on_validation_people_only():
    sys.path.insert(0, str(ROOT / "analyses"))
    import remedy as rm

    runs = [
        {"name": "two-stage+a", "seed": 0, "validation_qa": 0.2, "heldout_qa": 0.9},
        {"name": "two-stage+b", "seed": 0, "validation_qa": 0.3, "heldout_qa": 0.1},
        {"name": "two-stage+a", "seed": 1, "validation_qa": 0.9, "heldout_qa": 0.9},  # other seeds do not choose
        {"name": "two-stage", "seed": 0, "validation_qa": 0.5, "heldout_qa": 0.5},  # the baseline is not a candidate
    ]
    assert rm.choose(runs) == {"two-stage": "two-stage+b"}


def test_remedy_variants_mean_the_same_on_every_preset():
    sys.path.insert(0, str(ROOT / "analyses"))
    import remedy as rm

    from mechrecall.lab.config import get_preset

    for name, layers, steps in (("micro", 2, 600), ("default", 2, 2400)):
        p = get_preset(name)
        assert p.model.n_layers == layers and round(1.2 * p.mixed.steps) == steps
        assert rm.resolve(["a=[{last_layer}]", "mixed.steps={mixed_steps_x1.2}"], p) == [f"a=[{layers}]",
                                                                                       f"mixed.steps={steps}"]  # fmt: skip
    assert rm._shares_stage1(["two_stage.stage2.align_weight=1"])
    assert not rm._shares_stage1(["two_stage.stage1.lr=1"]) and not rm._shares_stage1([])
