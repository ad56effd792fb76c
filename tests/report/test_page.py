"""report.html: self-contained, every figure drawn with data, no JavaScript error (headless Chromium)."""

import os
from html.parser import HTMLParser

import pytest

from mechrecall.report.browser import check_page, find_chromium


def _need_chromium():
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI: .ci/run installs it (apt-get install chromium chromium-driver)")
        pytest.skip("Chromium not installed (setup.sh installs it when run as root)")


class _Tags(HTMLParser):
    """Collects the attributes of every <script>, <link> and <img> tag (script bodies are not parsed as tags)."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "link", "img"):
            self.refs += [v for k, v in attrs if k in ("src", "href")]


def test_report_is_self_contained(micro_run):
    out, _ = micro_run
    page = (out / "report.html").read_text()
    tags = _Tags()
    tags.feed(page)
    assert tags.refs == []  # plotly.js is inlined: nothing is loaded from anywhere
    for section in ("Recall", "Figures", "Provenance", "held-out QA", "checkpoints_sha256", "torch"):
        assert section in page
    assert page.count("class='caption'") >= 10
    # the micro pair is trained from scratch: its graft is said not to test the paper's shared-base claim, and the
    # figures are said to be one seed's pair
    assert "not a test of the paper&#x27;s claim" in page and "Analyses of one pair, seed 0" in page
    assert "means over seeds [0]" in page


def test_report_renders_in_headless_chromium(micro_run):
    _need_chromium()
    out, _ = micro_run
    check = check_page(out / "report.html")
    assert check["plotly"] and check["errors"] == []
    assert check["figures"] >= 10 and check["empty"] == []


def test_the_browser_check_catches_errors_and_empty_figures(micro_run, tmp_path):
    """The check is not vacuous: a thrown error and a figure without data are reported."""
    _need_chromium()
    out, _ = micro_run
    page = (out / "report.html").read_text()
    empty = "<div id='broken' class='plotly-graph-div'></div><script>Plotly.newPlot('broken', []);</script>"
    bad = page.replace(
        "<pre id='report-check'>", empty + "<script>throw new Error('boom');</script><pre id='report-check'>"
    )
    (tmp_path / "bad.html").write_text(bad)
    check = check_page(tmp_path / "bad.html")
    assert any("boom" in e for e in check["errors"])
    assert check["empty"] == [check["figures"] - 1]


def test_captions_say_agree_disagree_or_no_clear_difference():
    from mechrecall.report.analysis import versus

    # no interval, no margin: only the direction, and that nothing was compared
    assert "points the paper's way (no interval compared)" in versus(0.5, 0.2, "x")
    assert "points against the paper (no interval compared)" in versus(0.1, 0.2, "x")
    assert "no clear difference (within twice the spread" in versus(0.192, 0.189, "x", margin=2 * 0.008)
    assert "agrees (the difference exceeds" in versus(0.3, 0.189, "x", margin=2 * 0.008)
    # intervals: agreement only when the 95 % intervals do not overlap
    assert "agrees (95% intervals do not overlap)" in versus(0.5, 0.2, "x", intervals=((0.4, 0.6), (0.1, 0.3)))
    assert "no clear difference (95% intervals overlap)" in versus(0.5, 0.2, "x", intervals=((0.25, 0.6), (0.1, 0.3)))
    assert "does not agree" in versus(0.1, 0.5, "x", intervals=((0.0, 0.2), (0.4, 0.6)))


def test_report_cli_rebuilds_and_errors_cleanly(micro_run, tmp_path, capsys):
    from mechrecall.__main__ import main

    out, _ = micro_run
    before = (out / "report.html").read_text()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text().count("class='caption'") == before.count("class='caption'")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "results.json" in err and "\n" not in err


def test_from_scratch_reads_a_lab_checkpoints_model_source():
    from mechrecall.report.analysis import from_scratch

    assert from_scratch({"config": {"model": {"source": None}}})
    assert not from_scratch({"config": {"model": {"source": "smollm2-135m-instruct"}}})
    assert not from_scratch({}) and not from_scratch({"config": None})
