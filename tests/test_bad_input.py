"""Bad sizes, unwritable outputs and malformed files: one line naming the option or file, exit 2, before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mechrecall.__main__ import main as cli
from mechrecall.facts import FactFormatError, load_facts
from mechrecall.patching.__main__ import main as patching_cli

ROOT = Path(__file__).resolve().parents[1]


def _script(name, *args, cwd=None):
    r = subprocess.run([sys.executable, str(ROOT / "analyses" / name), *args], capture_output=True, text=True, cwd=cwd)
    return r.returncode, [line for line in r.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "script, args, option",
    [
        ("consistency.py", ["--checkpoints", "x", "--grad-facts", "-3"], "--grad-facts"),
        ("consistency.py", ["--checkpoints", "x", "--people", "0"], "--people"),
        ("attribution.py", ["--steps", "-1"], "--steps"),
        ("attribution.py", ["--people", "-2"], "--people"),
        ("patching.py", ["--pairs", "0"], "--pairs"),
        ("masks.py", ["--k", "1.5"], "--k"),
        ("stage2_tradeoff.py", ["--run", "r", "--steps", "0"], "--steps"),
    ],
)
def test_a_bad_size_is_one_line_naming_the_option(tmp_path, script, args, option):
    code, err = _script(script, *args, "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and option in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_patching_cli_refuses_too_few_people(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        patching_cli(["--checkpoint", "x", "--people", "-2", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--people" in err[0] and "at least 2" in err[0]


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _script("consistency.py", "--checkpoints", "nosuch", "--out", str(blocker / "sub"))
    assert code == 2 and len(err) == 1 and "--out" in err[0] and "is a file" in err[0], err
    code, err = _script("consistency.py", "--checkpoints", "nosuch", "--out", str(blocker))
    assert code == 2 and len(err) == 1 and "is a file, not a folder" in err[0], err


def test_a_read_only_filesystem_is_refused_before_any_work(capsys):
    """/proc is read-only even for root: the write probe fails there, before the checkpoint is even looked up."""
    assert cli(["train", "--preset", "micro", "--regime", "mixed", "--out", "/proc/mechrecall-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out '/proc/mechrecall-run' cannot be written" in err[0], err


def test_stage2_tradeoff_on_a_missing_run_is_one_line(tmp_path):
    code, err = _script("stage2_tradeoff.py", "--run", str(tmp_path / "nosuch"), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and "--run" in err[0] and "stage-1 checkpoint" in err[0], err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"preset": "x"})])
def test_report_on_a_garbage_results_file_names_it(tmp_path, capsys, content):
    (tmp_path / "results.json").write_text(content)
    assert cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "results.json") in err[0], err
    assert not (tmp_path / "report.html").exists()


def test_a_json_error_in_a_fact_file_reads_once(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"subject": "unterminated\n')
    with pytest.raises(FactFormatError) as e:
        load_facts(path)
    assert "at at" not in str(e.value) and "line 1, column" in str(e.value)
