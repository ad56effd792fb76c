"""``patching.json``: the one schema every command that patches writes, and the helpers that read it.

``python -m mechrecall.patching``, ``analyses/patching.py`` and the report all write this shape, so one reader serves
them all::

    {"schema": "mechrecall.patching/2",
     "settings": {...},                       # how it was run: formats, mode, metrics, sites, layers, seed, device
     "facts": {"source", "n_facts", ...},     # whose facts (a fact file, or a run's people of a split)
     "labels": ["two_stage", "mixed"],        # the models, in order (the keys of "models")
     "models": {label: {
         "source": "default-s0-mixed",        # what was loaded under this label
         "n": 40, "roles": [...],             # examples (pairs) and the roles patched
         "pairs": [{"source_fact", "base_fact", "relation"}, ...],   # which facts each example paired ({"subject",
                                                                    # "relation"} for noise tracing)
         "pair_counts": {"asked", "available", "kept", ...},         # why fewer pairs than asked, if so
         "sites": {site: {"axes": ["layer", "pos"], "labels": {"layer": [...], "pos": [...]},
                          "metrics": {metric: {"mean": [...], "base_mean", "source_mean", "per_example": [...]}}}},
         ...}}}                               # extra measurements of a model (the report: AtP check, noise tracing)

``mean`` has the site's axes (``[layer, pos]`` or ``[layer, head, pos]``); ``per_example`` adds the example axis.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mechrecall.patching.inputs import PatchResult

__all__ = ["SCHEMA", "site_record", "model_record", "patching_record", "read_patching", "best_site", "metric_mean"]

SCHEMA = "mechrecall.patching/2"


def site_record(results: PatchResult | Mapping[str, PatchResult], *, per_example: bool = True) -> dict:
    """One site's sweep (one :class:`PatchResult` per metric, from the same forwards) as its JSON record."""
    if isinstance(results, PatchResult):
        results = {results.metric: results}
    first = next(iter(results.values()))

    def metric(r: PatchResult) -> dict:
        rec = {
            "mean": r.mean().tolist(),
            "base_mean": float(r.base.mean()),
            "source_mean": None if r.source is None else float(r.source.mean()),
        }
        return rec | ({"per_example": r.values.tolist()} if per_example else {})

    return {
        "axes": list(first.axes[:-1]),  # (the last axis, the examples, is what "mean" averages over)
        "labels": {k: v for k, v in first.labels.items() if k != "example"},
        "metrics": {m: metric(r) for m, r in results.items()},
    }


def model_record(
    source: str, pairs: Sequence[Mapping], roles: Sequence[str], sites: Mapping[str, dict], counts: Mapping, **extra
) -> dict:
    """One model's results: what was loaded, which facts were paired (and why fewer than asked), each site's record,
    and any ``extra`` measurements under their own keys."""
    return {"source": source, "n": len(pairs), "roles": list(roles), "pairs": [dict(p) for p in pairs],
            "pair_counts": dict(counts), "sites": dict(sites), **extra}  # fmt: skip


def patching_record(settings: Mapping, models: Mapping[str, dict], facts: Mapping | None = None) -> dict:
    """The whole ``patching.json``: settings, the facts' description and one :func:`model_record` per label."""
    out = {"schema": SCHEMA, "settings": dict(settings)}
    if facts is not None:
        out["facts"] = dict(facts)
    return out | {"labels": list(models), "models": dict(models)}


def read_patching(path: str | Path) -> dict:
    """A ``patching.json`` of this schema (a file of another, older shape is refused in one line naming it)."""
    path = Path(path)
    result = json.loads(path.read_text())
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} file (found schema {result.get('schema')!r}); run the patching again")
    return result


def metric_mean(site: Mapping, metric: str) -> torch.Tensor:
    """A site record's mean of ``metric`` as a tensor with the site's axes (an unknown metric is named)."""
    if metric not in site["metrics"]:
        raise KeyError(f"metric {metric!r} was not measured here (measured: {', '.join(site['metrics'])})")
    return torch.tensor(site["metrics"][metric]["mean"])


def best_site(site: Mapping, metric: str) -> dict:
    """Where a site's mean ``metric`` is highest: the value and one label per axis (layer, head, position or role)."""
    mean = metric_mean(site, metric)
    flat = int(mean.argmax())
    where = {}
    for axis, size in reversed(list(zip(site["axes"], mean.shape))):
        flat, i = divmod(flat, size)
        labels = site["labels"].get(axis)
        where[axis] = labels[i] if labels is not None and i < len(labels) else i
    return {"value": float(mean.max()), **dict(reversed(list(where.items())))}
