"""An analysis's files are replaced together: a run killed while writing leaves the previous JSON and page."""

import json
import os

import pytest

import mechrecall.io as io_mod
from mechrecall.io import atomic_write_files


def test_an_interrupted_rewrite_leaves_the_previous_pair(tmp_path, monkeypatch):
    atomic_write_files(tmp_path, {"masks.json": {"run": 1}, "masks.html": "<p>run 1</p>"})
    real_fdopen, opened = os.fdopen, []

    def killed_on_the_second_file(fd, *a, **k):
        opened.append(fd)
        if len(opened) == 2:
            raise KeyboardInterrupt
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(io_mod.os, "fdopen", killed_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_files(tmp_path, {"masks.json": {"run": 2}, "masks.html": "<p>run 2</p>"})
    monkeypatch.undo()
    assert json.loads((tmp_path / "masks.json").read_text()) == {"run": 1}  # not run 2's JSON beside run 1's page
    assert (tmp_path / "masks.html").read_text() == "<p>run 1</p>"
    stale = tmp_path / ".masks.json.abc.tmp"  # what a kill -9 (no cleanup) would leave
    stale.write_text("half")
    atomic_write_files(tmp_path, {"masks.json": {"run": 3}, "masks.html": "<p>run 3</p>"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.html", "masks.json"]
    assert json.loads((tmp_path / "masks.json").read_text()) == {"run": 3}
