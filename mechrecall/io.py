"""Atomic file and folder writes: a reader sees the old content or the new, never a torn write."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_write_files", "atomic_write_dir", "finite", "sha256_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: object) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_files(folder: str | Path, files: dict[str, str | dict | list]) -> list[Path]:
    """Write several files of one result together (``name -> text``, or a dict / list written as JSON).

    Every content is serialised and written to a temporary beside its target first; only then are they swapped in,
    one rename each, so a run killed while writing leaves all the previous files (an analysis's JSON and its figures
    never come from two runs, short of a kill in the microseconds between renames). Temporaries of an earlier,
    interrupted write of the same names are removed first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    texts = {n: c if isinstance(c, str) else json.dumps(c, indent=2, sort_keys=False) + "\n" for n, c in files.items()}
    temps: dict[str, str] = {}
    try:
        for name, text in texts.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            temps[name] = tmp
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise
    for name, tmp in temps.items():
        os.replace(tmp, folder / name)
    return [folder / n for n in files]


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def finite(obj):
    """NaN -> None, recursively through dicts and lists, so that ``json`` writes valid JSON (it writes ``NaN``)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` beside ``path`` and swap it in; a failure leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
