"""The analysis registry: one module with ``ANALYSIS`` is all it takes for reproduce, results.md, the page and
``python -m mechrecall analyze`` to run and show an analysis."""

import json
import shutil
import sys

import pytest

import mechrecall.report as report_pkg
from mechrecall.report.analysis import analyses, get_analysis, pair_labels

FAKE = """
import json
from pathlib import Path

from mechrecall.report.analysis import Analysis, labels_of


def run_pair(first, second, out, *, registry=None, labels=None, context=None):
    result = {"labels": list(labels or ("two_stage", "mixed")), "sources": [first, second], "value": 0.25}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "toy.json").write_text(json.dumps(result))
    return result


def captioned(result):
    import plotly.graph_objects as go

    return [(go.Figure(go.Bar(x=labels_of(result), y=[1, 2])), f"Toy analysis: value {result['value']}")]


ANALYSIS = Analysis(name="toy", output="toy.json", order=35, captioned=captioned, run_pair=run_pair,
                    summary=lambda r: ["| toy | " + str(r["value"]) + " |"], title=lambda r: "Toy analysis")
"""


@pytest.fixture
def toy_analysis(tmp_path, monkeypatch):
    """A new analysis module on the report package's path: nothing else is edited."""
    folder = tmp_path / "extra_report_modules"
    folder.mkdir()
    (folder / "toy.py").write_text(FAKE)
    monkeypatch.setattr(report_pkg, "__path__", [*report_pkg.__path__, str(folder)])
    yield
    sys.modules.pop("mechrecall.report.toy", None)


def test_every_report_analysis_is_registered_once_in_page_order():
    names = [a.name for a in analyses()]
    assert names[:4] == ["consistency", "masks", "patching", "attribution"] and len(set(names)) == len(names)
    assert {"grafting", "predict", "remedy"} <= set(names)
    assert all(a.run_pair is not None for a in analyses() if not a.beside)
    with pytest.raises(ValueError, match="unknown analysis 'nope'; registered: consistency"):
        get_analysis("nope")


def test_pair_labels():
    assert pair_labels("a", "b", None, None) == [("two_stage", "a"), ("mixed", "b")]
    assert pair_labels("a", "a", "facts.jsonl", None) == [("a", "a"), ("a#2", "a")]
    with pytest.raises(ValueError, match="give 2 different names"):
        pair_labels("a", "b", None, ["x", "x"])


def test_a_new_module_is_run_tabulated_and_drawn(toy_analysis, micro_run, tmp_path, monkeypatch):
    import mechrecall.report.analysis as registry
    from mechrecall.report.page import build
    from mechrecall.report.reproduce import analyses_markdown, run_analyses

    out, reg = micro_run
    toy = get_analysis("toy")
    assert [a.name for a in analyses()].index("toy") == 3  # its order: between patching and attribution
    run = tmp_path / "run"
    shutil.copytree(out, run)  # the other analyses' JSON are there already: run only the new one
    monkeypatch.setattr(registry, "analyses", lambda: [toy])
    seconds = run_analyses("micro-s0-two-stage", "micro-s0-mixed", run, registry=reg)
    assert list(seconds) == ["toy"]
    assert json.loads((run / "toy.json").read_text())["sources"] == ["micro-s0-two-stage", "micro-s0-mixed"]
    monkeypatch.undo()
    monkeypatch.setattr(report_pkg, "__path__", [*report_pkg.__path__, str(tmp_path / "extra_report_modules")])
    assert "## Toy analysis\n\n| toy | 0.25 |" in analyses_markdown(run)
    assert "Toy analysis: value 0.25" in build(run).read_text()


def test_the_analyze_command_loops_over_the_registry(micro_run, tmp_path, capsys):
    from mechrecall.__main__ import main

    _, reg = micro_run
    assert main(["analyze", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(a.name in listed for a in analyses())
    out = tmp_path / "pair"
    # --only takes one comma-separated argument, so it cannot swallow the checkpoints after it
    assert main(["analyze", "--only", "patching", "micro-s0-two-stage", "micro-s0-mixed", "--registry", str(reg),
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "patching.json").read_text())["labels"] == ["two_stage", "mixed"]
    assert "## Cross-format patching" in (out / "results.md").read_text()
    assert main(["analyze", "micro-s0-two-stage", "--out", str(tmp_path / "x")]) == 2
    assert "two checkpoints" in capsys.readouterr().err
    assert main(["analyze", "a", "b", "--only", "grafting", "--out", str(tmp_path / "y")]) == 2
    assert "written by its analyses/ script" in capsys.readouterr().err
