"""Checkpoint folders: a ``save_pretrained`` folder plus ``mechrecall.json`` metadata, written atomically.

A checkpoint is a ``save_pretrained`` folder (``config.json``, ``model.safetensors``, tokenizer files) plus
``mechrecall.json`` (regime, stage, step, seed, dataset hash, metrics), written atomically: a crash mid-write leaves
the previous checkpoint in place. Any trainer can write one with :func:`save_checkpoint`; :func:`mechrecall.loading.
load_model` reads any of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mechrecall.io import atomic_write_dir

__all__ = ["META_FILE", "CheckpointError", "save_checkpoint", "read_meta"]

META_FILE = "mechrecall.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or does not match what was asked for."""


def save_checkpoint(
    path: str | Path,
    model,
    tokenizer,
    meta: dict,
    extra: dict | None = None,
    writers: tuple = (),
    state_dict: dict | None = None,
) -> Path:
    """Write ``model`` + ``tokenizer`` + ``meta`` (and optional ``extra`` torch objects) to ``path`` atomically.

    ``writers`` are callables ``f(folder)`` that add files (e.g. the gradient trace) inside the same atomic write.
    ``state_dict`` replaces the model's own weights (a sharded model's gathered full state).
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if extra is not None:
            torch.save(extra, tmp / "trainer_state.pt")
        for write in writers:
            write(tmp)

    return atomic_write_dir(path, fill)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
    meta = path / META_FILE
    return json.loads(meta.read_text()) if meta.exists() else {}
