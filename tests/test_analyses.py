"""Every analysis script runs on its own against registry checkpoints and writes its JSON and figure."""

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
        ("gradient_consistency.py", ["gradient_consistency.json", "gradient_consistency.html"], []),
        ("representation_consistency.py", ["representation_consistency.json", "representation_consistency.html"], []),
        ("masks.py", ["masks.json", "masks.html"], ["--draws", "2"]),
        ("patching.py", ["patching.json", "patching.html"], ["--pairs", "24"]),
        ("attribution.py", ["attribution.json", "attribution.html"], ["--people", "4"]),
    ],
)
def test_analysis_script(micro_run, tmp_path, script, outputs, extra):
    _, reg = micro_run
    cmd = [sys.executable, str(ROOT / "analyses" / script), "--two-stage", "micro-s0-two-stage", "--mixed",
           "micro-s0-mixed", "--registry", str(reg), "--out", str(tmp_path), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / outputs[0]).read_text())
    assert {"two_stage", "mixed"} <= set(data)
    assert "plotly" in (tmp_path / outputs[1]).read_text()
