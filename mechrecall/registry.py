"""``checkpoints.yaml``: the registry of named checkpoints, validated against a schema and written atomically.

An entry names a checkpoint and says where it came from::

    version: 1
    checkpoints:
    - name: default-s0-mixed
      path: runs/default/seed0/mixed/final     # relative to the registry file's folder
      base_model: scratch:llama-L2-d128         # another entry's name, a Hugging Face id, or scratch:<arch>
      regime: mixed                            # base | pretrained | two_stage | mixed
      stage: final
      seed: 0
      dataset_hash: 3f0c...
      metrics: {heldout_qa: 0.62, trained_qa: 1.0, storage: 1.0}

``path`` may also be ``hf:<org>/<name>`` or a ``.gguf`` file for pretrained models. The registry file written to is
``$MECHRECALL_REGISTRY`` if set, else ``checkpoints.yaml`` in the working folder; names are looked up there and then
in the entries the package ships (:func:`search_path`).
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mechrecall.io import atomic_write_text

__all__ = [
    "RegistryError",
    "Entry",
    "Registry",
    "default_path",
    "load_registry",
    "register",
    "relative_path",
    "resolve",
    "search_path",
    "BUILTIN",
]

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class RegistryError(ValueError):
    """The registry file is malformed, or a name is unknown; the message names the file and the entry or key."""


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_RE)
    path: str = Field(min_length=1)
    base_model: str | None = None
    regime: Literal["base", "pretrained", "two_stage", "mixed", "pre_instruction"]
    stage: str = "final"
    seed: int | None = None
    dataset_hash: str | None = None
    metrics: dict[str, float] = {}
    created: str | None = None


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    checkpoints: list[Entry] = []

    @field_validator("checkpoints")
    @classmethod
    def _unique(cls, entries: list[Entry]) -> list[Entry]:
        seen: set[str] = set()
        for e in entries:
            if e.name in seen:
                raise ValueError(f"duplicate checkpoint name {e.name!r}")
            seen.add(e.name)
        return entries

    def get(self, name: str) -> Entry | None:
        return next((e for e in self.checkpoints if e.name == name), None)


def default_path() -> Path:
    return Path(os.environ.get("MECHRECALL_REGISTRY", "checkpoints.yaml"))


def load_registry(path: str | Path | None = None, *, missing_ok: bool = True) -> Registry:
    """Parse and validate a registry file (an absent file is an empty registry when ``missing_ok``)."""
    path = Path(path) if path is not None else default_path()
    if not path.exists():
        if missing_ok:
            return Registry()
        raise RegistryError(f"no checkpoint registry at {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RegistryError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return Registry()
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected a mapping with 'version' and 'checkpoints', got {type(raw).__name__}")
    try:
        return Registry.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = list(err["loc"])
            where = ".".join(str(x) for x in loc)
            if len(loc) >= 2 and loc[0] == "checkpoints" and isinstance(loc[1], int):
                entries = raw.get("checkpoints") or []
                name = (
                    entries[loc[1]].get("name") if loc[1] < len(entries) and isinstance(entries[loc[1]], dict) else None
                )
                where = f"checkpoint #{loc[1]} ({name!r}) key {'.'.join(str(x) for x in loc[2:]) or '<entry>'}"
            problems.append(f"{where}: {err['msg']}")
        raise RegistryError(f"{path}: invalid registry:\n  " + "\n  ".join(problems)) from None


def _dump(reg: Registry) -> str:
    data = reg.model_dump(mode="json", exclude_none=True)
    return (
        "# mechrecall checkpoint registry (schema: mechrecall/registry.py). Written by training; edit with care.\n"
        + yaml.safe_dump(data, sort_keys=False, width=120)
    )


def register(entry: Entry, path: str | Path | None = None, *, overwrite: bool = True) -> Path:
    """Add or replace ``entry`` (by name) under a file lock, replacing the file atomically."""
    path = Path(path) if path is not None else default_path()
    with FileLock(str(path) + ".lock"):
        reg = load_registry(path)
        old = reg.get(entry.name)
        if old is not None and not overwrite:
            raise RegistryError(f"{path}: checkpoint {entry.name!r} already registered (pass overwrite=True)")
        if entry.created is None:
            entry = entry.model_copy(update={"created": datetime.now(UTC).isoformat(timespec="seconds")})
        entries = [e for e in reg.checkpoints if e.name != entry.name] + [entry]
        atomic_write_text(path, _dump(Registry(checkpoints=entries)))
    return path


def relative_path(target: str | Path, registry_path: str | Path | None = None) -> str:
    """``target`` relative to the registry file's folder when it lies below it, else absolute."""
    base = (Path(registry_path) if registry_path is not None else default_path()).resolve().parent
    target = Path(target).resolve()
    try:
        return str(target.relative_to(base))
    except ValueError:
        return str(target)


BUILTIN = Path(__file__).with_name("data") / "builtin_checkpoints.yaml"


def search_path(registry_path: str | Path | None = None) -> list[Path]:
    """Where a registry name is looked up, in order: ``registry_path`` (a command's ``--registry``) if given, else
    ``$MECHRECALL_REGISTRY`` if set, else ``checkpoints.yaml`` in the working folder; then the entries the package
    ships (:data:`BUILTIN`: the pretrained bases), so those names resolve from any folder."""
    first = Path(registry_path) if registry_path is not None else default_path()
    return [first, BUILTIN]


def resolve(name_or_path: str, registry_path: str | Path | None = None) -> tuple[str, Entry | None]:
    """A registry name or a path/id -> (location, entry). Folder locations are absolute and must exist.

    Names are looked up along :func:`search_path` (the first registry that has the name wins; a folder entry is
    relative to its own registry's folder). Raises :class:`RegistryError` for a name that is neither registered
    anywhere there nor an existing path, listing where it looked.
    """
    for reg_path in search_path(registry_path):
        if reg_path == BUILTIN and (Path(name_or_path).exists() or name_or_path.startswith("hf:")):
            return name_or_path, None  # a path the user has wins over a name the package ships
        entry = load_registry(reg_path).get(name_or_path)
        if entry is not None:
            break
    else:
        if Path(name_or_path).exists() or name_or_path.startswith("hf:"):
            return name_or_path, None
        looked = []
        for reg_path in search_path(registry_path):
            names = [e.name for e in load_registry(reg_path).checkpoints]
            state = (
                "missing"
                if not reg_path.exists()
                else (", ".join(names[:8]) + (", ..." if len(names) > 8 else "") or "empty")
            )
            looked.append(f"{reg_path} ({state})")
        raise RegistryError(
            f"{name_or_path!r} is neither an existing path nor a checkpoint name in {'; '.join(looked)}: give the "
            f"registry that holds it with --registry (or $MECHRECALL_REGISTRY)"
        )
    loc = entry.path
    if loc.startswith("hf:") or re.match(r"^[A-Za-z]+:", loc):
        return loc, entry
    folder = (reg_path.resolve().parent / loc).resolve()
    if not folder.exists():
        raise RegistryError(f"{reg_path}: checkpoint {entry.name!r} points to {str(folder)!r}, which does not exist")
    return str(folder), entry
