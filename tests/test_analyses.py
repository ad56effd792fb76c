"""Every analysis script runs on its own against registry checkpoints and writes its JSON and figure; the lab pair's
outputs keep their keys (two_stage / mixed) whatever the device flags say. Your own facts on any checkpoint:
``tests/test_user_facts.py``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, outputs, extra",
    [
        ("recall_gap.py", ["recall.json", "recall.html"], []),
        # (sizes cut for CI time: these check each script's plumbing and outputs, not the measures' values)
        (
            "gradient_consistency.py",
            ["gradient_consistency.json", "gradient_consistency.html"],
            ["--count", "40", "--grad-facts", "32"],
        ),
        (
            "representation_consistency.py",
            ["representation_consistency.json", "representation_consistency.html"],
            ["--count", "40", "--grad-facts", "32", "--no-parity"],
        ),
        ("masks.py", ["masks.json", "masks.html"], ["--draws", "2"]),
        ("patching.py", ["patching.json", "patching.html"], ["--pairs", "24"]),
        ("attribution.py", ["attribution.json", "attribution.html"], ["--people", "4"]),
    ],
)
def test_analysis_script(micro_run, tmp_path, script, outputs, extra):
    _, reg = micro_run
    device = ["--device", "cpu", "--dtype", "float32"]
    cmd = [sys.executable, str(ROOT / "analyses" / script), "--two-stage", "micro-s0-two-stage", "--mixed",
           "micro-s0-mixed", "--registry", str(reg), "--out", str(tmp_path), *device, *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / outputs[0]).read_text())
    # patching.json (schema mechrecall.patching/2) keeps its models under "models"; the other analyses at the top
    assert {"two_stage", "mixed"} <= set(data.get("models", data))
    assert "plotly" in (tmp_path / outputs[1]).read_text()


def test_lab_pair_through_checkpoints_and_labels(micro_run, tmp_path):
    """--checkpoints A B with --labels is the same measurement as --two-stage A --mixed B, under the given names."""
    _, reg = micro_run
    cmd = [sys.executable, str(ROOT / "analyses" / "consistency.py"), "--checkpoints", "micro-s0-two-stage",
           "micro-s0-mixed", "--labels", "two_stage", "mixed", "--registry", str(reg), "--out", str(tmp_path),
           "--people", "20", "--grad-facts", "16", "--no-parity"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "consistency.json").read_text())
    assert set(data["gradient"]) == {"two_stage", "mixed"} and data["people"] == "heldout"
    assert data["backend_parity"] == {"two_stage": {}, "mixed": {}}


def test_lab_scripts_refuse_bad_devices_in_one_line(micro_run, tmp_path):
    _, reg = micro_run
    cmd = [sys.executable, str(ROOT / "analyses" / "masks.py"), "--registry", str(reg), "--two-stage",
           "micro-s0-two-stage", "--mixed", "micro-s0-mixed", "--dtype", "fp8", "--out", str(tmp_path / "o")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --dtype 'fp8'"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
