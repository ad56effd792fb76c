"""The example notebooks run top to bottom in a real Jupyter kernel on the micro reproduction, and show plotly."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "patching_masks.ipynb"])
def test_notebook_executes(micro_run, monkeypatch, tmp_path, name):
    out, reg = micro_run
    monkeypatch.setenv("MECHRECALL_RUN", str(out))  # the kernel inherits the environment
    monkeypatch.setenv("MECHRECALL_REGISTRY", str(reg))
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs), "no plotly figure rendered"
