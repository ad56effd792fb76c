"""Interventions on state dicts through a parameter mask: ablate it, graft it from another checkpoint, measure recall.

All functions are pure: they take state dicts (HF names) and a :data:`mechrecall.masks.Mask` and return a *new*
state dict that shares every untouched tensor with the input (only masked matrices are copied). Undo an
intervention by grafting the original back: ``graft(ablate(sd, m, base=b), sd, m)`` equals ``sd`` exactly.

>>> ablated = ablate(mixed_sd, shared, mode="base", base=base_sd)   # undo fine-tuning on the shared set
>>> with loaded(model, ablated):
...     heldout = recall(model, tokenizer, facts, "heldout")   # mechrecall.recall
>>> grafted = graft(two_stage_sd, mixed_sd, shared)               # transplant mixed's shared parameters

Modes of :func:`ablate`: ``base`` (reset to the pre-fine-tuning value), ``zero``, ``mean`` (the matrix's mean over its
unmasked entries, taken in float32).

Names are whatever the model's ``named_parameters()`` calls them, so every architecture works (masks from
:func:`mechrecall.masks.topk_mask` with ``model=``). Tensors may live on any device: an edited tensor stays on the
device and in the dtype of the state it edits (masks and donor values are moved there), and :func:`loaded` copies into
the model's parameters wherever they live.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from mechrecall.facts import FactSet
from mechrecall.masks import Mask, mask_count, random_mask_like
from mechrecall.recall import recall

__all__ = [
    "StateDict",
    "ABLATIONS",
    "ablate",
    "graft",
    "state_of",
    "loaded",
    "recall_under",
    "with_random_controls",
]

StateDict = Mapping[str, Tensor]
ABLATIONS = ("base", "zero", "mean")


def _check(state: StateDict, mask: Mask, what: str) -> None:
    missing = [n for n in mask if n not in state]
    if missing:
        raise KeyError(f"{what} has no parameter {missing[0]!r} named by the mask")
    bad = [n for n in mask if state[n].shape != mask[n].shape]
    if bad:
        raise ValueError(f"mask shape {tuple(mask[bad[0]].shape)} != {what} {bad[0]!r} {tuple(state[bad[0]].shape)}")


def ablate(state: StateDict, mask: Mask, mode: str = "base", base: StateDict | None = None) -> dict[str, Tensor]:
    """Replace the masked entries of ``state`` (``base`` values, zeros, or the matrix's unmasked mean)."""
    if mode not in ABLATIONS:
        raise ValueError(f"unknown ablation mode {mode!r}; expected one of {ABLATIONS}")
    if mode == "base" and base is None:
        raise ValueError("mode='base' needs the base state dict (the checkpoint before fine-tuning)")
    _check(state, mask, "state")
    if base is not None:
        _check(base, mask, "base")
    out = dict(state)
    for n, m in mask.items():
        t = state[n].clone()
        m = m.to(t.device)
        if mode == "base":
            t[m] = base[n].to(t.device)[m].to(t.dtype)
        elif mode == "zero":
            t[m] = 0
        else:
            rest = t[~m]
            t[m] = rest.float().mean().to(t.dtype) if rest.numel() else 0
        out[n] = t
    return out


def graft(target: StateDict, donor: StateDict, mask: Mask) -> dict[str, Tensor]:
    """``target`` with the masked entries taken from ``donor`` (same architecture and names)."""
    _check(target, mask, "target")
    _check(donor, mask, "donor")
    out = dict(target)
    for n, m in mask.items():
        t = target[n].clone()
        m = m.to(t.device)
        t[m] = donor[n].to(t.device)[m].to(t.dtype)
        out[n] = t
    return out


def state_of(model) -> dict[str, Tensor]:
    """Detached parameters by HF name (tied weights once)."""
    return {n: p.detach() for n, p in model.named_parameters()}


@contextmanager
def loaded(model, state: StateDict) -> Iterator:
    """Temporarily copy ``state``'s tensors into ``model``'s parameters; the originals come back on exit.

    ``state`` may hold any subset of the parameters, on any device and in any dtype (``copy_`` moves and casts them to
    the parameter's); tensors that *are* the model's parameters are skipped.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in state if n not in params]
    if unknown:
        raise KeyError(f"model has no parameter {unknown[0]!r}")
    changed = {n: t for n, t in state.items() if t is not params[n]}
    saved = {n: params[n].detach().clone() for n in changed}
    try:
        with torch.no_grad():
            for n, t in changed.items():
                params[n].copy_(t)
        yield model
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


def recall_under(
    model, tokenizer, facts: FactSet, state: StateDict, splits: Sequence[str] = ("heldout",)
) -> dict[str, float]:
    """Greedy exact-match QA recall of each split of ``facts`` with ``state`` loaded into ``model``."""
    with loaded(model, state):
        return {s: recall(model, tokenizer, facts, s) for s in splits}


def with_random_controls(
    model,
    tokenizer,
    facts: FactSet,
    mask: Mask,
    make_state,
    *,
    draws: int = 5,
    seed: int = 0,
    splits: Sequence[str] = ("heldout",),
) -> dict:
    """Recall after ``make_state(mask)`` and after ``make_state(random_mask_like(mask))`` for ``draws`` seeds.

    Returns ``{"mask": {split: recall}, "random": {split: [recall per draw]}, "random_mean", "random_std", "n"}``.
    """
    own = recall_under(model, tokenizer, facts, make_state(mask), splits)
    rand = [
        recall_under(model, tokenizer, facts, make_state(random_mask_like(mask, seed + d)), splits)
        for d in range(draws)
    ]
    return {
        "mask": own,
        "random": {s: [r[s] for r in rand] for s in splits},
        "random_mean": {s: float(np.mean([r[s] for r in rand])) for s in splits},
        "random_std": {s: float(np.std([r[s] for r in rand])) for s in splits},
        "n": mask_count(mask),
    }
