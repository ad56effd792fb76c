"""The documentation site builds in strict mode: every page in the nav, every link and every API reference resolves."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "patching" / "index.html").exists()
    assert "activation_patch" in (tmp_path / "site" / "api" / "patching" / "index.html").read_text()


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in ("docs/results/lab.md", "docs/results/pretrained.md", "docs/guides/own-facts-and-models.md"):
        assert page in text and (ROOT / page).exists()
