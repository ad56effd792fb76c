"""Shared-update parameter masks: which parameters matter to the storage format, to the query format, and to both.

A *mask* is a plain ``dict[str, BoolTensor]`` keyed by Hugging Face parameter name, one boolean tensor of the
parameter's shape per masked matrix. Build one from any per-parameter *importance* (``dict[str, Tensor]`` of the
same shapes):

- training trace: :class:`mechrecall.lab.trace.GradientTrace` ``.importance("storage")`` / ``("query")`` (mean |grad| or
  |grad x update| accumulated during training);
- post hoc: :func:`posthoc_importance` (mean |per-example gradient| of one format's facts on a checkpoint);
- update-based: :func:`update_importance` (|theta_after - theta_before| of a stage that trained one format).

>>> storage = topk_mask(trace.importance("storage"), k=0.05, model=model)   # top 5% per weight matrix
>>> query = topk_mask(trace.importance("query"), k=0.05, model=model)
>>> shared = mask_and(storage, query)
>>> mask_fraction(shared), jaccard(storage, query), random_overlap(0.05, 0.05)
>>> localize(shared, model.config)["per_layer"]

Rankings are *per matrix* by default (each weight matrix contributes its own top k%, so matrices with larger
gradient scales do not take the whole budget) or *global* (one ranking over every selected parameter). By default only
the transformer blocks' weight matrices are ranked (:func:`block_matrices`): embeddings, the tied unembedding and the
norms are left out (a person's name embedding is updated by its own facts only, which says nothing about shared
circuitry). Which parameters those are is asked of :mod:`mechrecall.arch` (:func:`mechrecall.arch.is_block_matrix`
for the model or config given as ``model=``; from the names alone otherwise), and :func:`localize` splits masks into
heads and neurons through its layouts, so every supported architecture works: fused query/key/value weights
(GPT-NeoX, GPT-2, Phi-3), GPT-2's transposed ``Conv1D`` weights, Phi-3's fused gate/up projection and grouped-query
attention. Masks live on the CPU whatever device the importances came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechrecall import arch

__all__ = [
    "Mask",
    "Importance",
    "ModelOrConfig",
    "block_matrices",
    "topk_mask",
    "mask_and",
    "mask_or",
    "mask_not",
    "mask_minus",
    "mask_count",
    "mask_size",
    "mask_fraction",
    "jaccard",
    "random_overlap",
    "random_mask_like",
    "localize",
    "gini",
    "top_share",
    "MaskComparison",
    "posthoc_importance",
    "update_importance",
    "masked_cosines",
]

Mask = dict[str, Bool[Tensor, "..."]]
Importance = Mapping[str, Float[Tensor, "..."]]
ModelOrConfig = Any  # a *ForCausalLM or its PreTrainedConfig (what mechrecall.arch accepts)


def block_matrices(name: str, model: ModelOrConfig | None = None) -> bool:
    """The default selection: attention and MLP weight matrices of the transformer blocks (no norms, biases,
    embeddings or unembedding), by HF parameter name.

    With ``model`` (a ``*ForCausalLM`` or its config) this is :func:`mechrecall.arch.is_block_matrix`. Without it the
    name alone decides: a name is selected when some row of the architecture table lists it as a block weight matrix
    (:func:`mechrecall.arch.place_of`); the supported families' names do not collide, so this agrees with the model's
    own row for them, but pass ``model`` when you have it.
    """
    if model is not None:
        return arch.is_block_matrix(name, model)
    place = arch.place_of(name)
    return place is not None and place.kind is not None


def _select(
    importance: Importance, include: Callable[[str], bool] | None, model: ModelOrConfig | None = None
) -> dict[str, Tensor]:
    if include is None:

        def include(n: str) -> bool:
            return block_matrices(n, model)

    out = {n: t.detach().float().cpu() for n, t in importance.items() if include(n)}
    if not out:
        raise ValueError(f"no parameter of the importance map passes the filter (names: {list(importance)[:4]}...)")
    return out


def _top_count(values: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` largest entries (stable: ties go to the earlier index, so masks are deterministic)."""
    flat = values.flatten()
    n = flat.numel()
    if count <= 0:
        return torch.zeros(values.shape, dtype=torch.bool)
    if count >= n:
        return torch.ones(values.shape, dtype=torch.bool)
    if torch.isnan(flat).any():  # NaN orders by the sort's rules; keep the reference path
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.argsort(flat, descending=True, stable=True)[:count]] = True
        return keep.view(values.shape)
    # The same mask as a stable descending argsort, without sorting (a sort of 10^8 scores takes tens of seconds):
    # everything above the count-th largest value, then the earliest of the entries equal to it.
    threshold = flat.kthvalue(n - count + 1).values
    keep = flat > threshold
    ties = torch.nonzero(flat == threshold)[:, 0]
    keep[ties[: count - int(keep.sum())]] = True
    return keep.view(values.shape)


def topk_mask(
    importance: Importance,
    k: float,
    *,
    scope: str = "per_matrix",
    include: Callable[[str], bool] | None = None,
    model: ModelOrConfig | None = None,
) -> Mask:
    """The top ``k`` fraction (0 < k <= 1) of parameters by importance, ranked ``per_matrix`` or ``global``ly.

    ``include(name)`` picks the parameters ranked; by default :func:`block_matrices` for ``model`` (a ``*ForCausalLM``
    or its config), or judged from the names when no model is given. The mask is on the CPU.
    """
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
    sel = _select(importance, include, model)
    if scope == "per_matrix":
        return {n: _top_count(t, round(k * t.numel())) for n, t in sel.items()}
    if scope != "global":
        raise ValueError(f"unknown scope {scope!r}; expected 'per_matrix' or 'global'")
    flat = torch.cat([t.flatten() for t in sel.values()])
    keep = _top_count(flat, round(k * flat.numel()))
    out, start = {}, 0
    for n, t in sel.items():
        out[n] = keep[start : start + t.numel()].view(t.shape)
        start += t.numel()
    return out


def _check_same(a: Mask, b: Mask) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"masks cover different parameters: {sorted(set(a) ^ set(b))[:4]}")


def mask_and(a: Mask, b: Mask) -> Mask:
    _check_same(a, b)
    return {n: a[n] & b[n] for n in a}


def mask_or(a: Mask, b: Mask) -> Mask:
    _check_same(a, b)
    return {n: a[n] | b[n] for n in a}


def mask_not(a: Mask) -> Mask:
    return {n: ~m for n, m in a.items()}


def mask_minus(a: Mask, b: Mask) -> Mask:
    """Parameters in ``a`` but not in ``b`` (e.g. storage-only = storage minus query)."""
    _check_same(a, b)
    return {n: a[n] & ~b[n] for n in a}


def mask_count(mask: Mask) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


def mask_size(mask: Mask) -> int:
    """Number of parameters the mask ranges over (selected or not)."""
    return int(sum(m.numel() for m in mask.values()))


def mask_fraction(mask: Mask, total: int | None = None) -> float:
    """Selected parameters / ``total`` (default: the parameters the mask ranges over)."""
    return mask_count(mask) / (mask_size(mask) if total is None else total)


def jaccard(a: Mask, b: Mask) -> float:
    inter, union = mask_count(mask_and(a, b)), mask_count(mask_or(a, b))
    return inter / union if union else 0.0


def random_overlap(p: float, q: float) -> dict[str, float]:
    """What two independent random masks of fractions ``p`` and ``q`` share: fraction ``p*q`` and Jaccard."""
    shared = p * q
    return {"shared_fraction": shared, "jaccard": shared / (p + q - shared) if p + q > shared else 0.0}


def random_mask_like(mask: Mask, seed: int) -> Mask:
    """A random mask with the same number of selected entries *in every matrix* as ``mask`` (a size-matched control)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in mask.items():
        keep = torch.zeros(m.numel(), dtype=torch.bool)
        keep[torch.randperm(m.numel(), generator=g)[: int(m.sum())]] = True
        out[n] = keep.view(m.shape)
    return out


# ------------------------------------------------------------------------------------------------ localization
def localize(mask: Mask, config: ModelOrConfig) -> dict[str, np.ndarray]:
    """Count selected parameters per layer, attention head, key/value head and MLP neuron.

    ``config`` is the model or its config (any architecture :mod:`mechrecall.arch` supports). Every masked parameter
    inside block ``L`` counts for ``per_layer[L]``; block weight matrices (and their biases) are split into units by
    :func:`mechrecall.arch.unit_counts`: a query head owns its rows of the query projection and the columns of the
    attention output projection that read it, a key/value head its rows of the key and value projections (for fused
    ``qkv`` weights: its parts of the fused rows or, in GPT-2, columns), an MLP neuron its row of each input
    projection (gate and up, or the fused gate/up: both halves) and its column of the output projection (GPT-2's
    ``Conv1D`` weights are transposed; the layout handles that). ``heads`` adds to each query head its key/value
    head's count / g, with ``g = n_heads / n_kv_heads`` query heads per key/value head (so ``heads`` sums to all
    attention entries). Returns arrays ``per_layer`` [L], ``q_heads`` [L, H], ``kv_heads`` [L, KV], ``heads`` [L, H],
    ``neurons`` [L, d_mlp] and the same with ``_total`` (how many parameters each unit has) for fractions.
    """
    d = arch.dims(config)
    L, H, KV = d.n_layers, d.n_heads, d.n_kv_heads
    out = {
        "per_layer": np.zeros(L),
        "q_heads": np.zeros((L, H)),
        "kv_heads": np.zeros((L, KV)),
        "neurons": np.zeros((L, d.d_mlp)),
    }
    totals = {k: np.zeros_like(v) for k, v in out.items()}
    for name, m in mask.items():
        layer = arch.layer_of(name, config)
        if layer is None:
            continue
        out["per_layer"][layer] += float(m.sum())
        totals["per_layer"][layer] += m.numel()
        if not arch.has_layout(name, config):
            continue
        sizes = arch.unit_sizes(name, m.shape, config)
        for key, counts in arch.unit_counts(name, m, config).items():
            out[key][layer] += counts.cpu().numpy()
            totals[key][layer] += sizes[key]
    group = H // KV
    out["heads"] = out["q_heads"] + np.repeat(out["kv_heads"], group, axis=1) / group
    totals["heads"] = totals["q_heads"] + np.repeat(totals["kv_heads"], group, axis=1) / group
    return out | {f"{k}_total": v for k, v in totals.items()}


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = spread evenly, -> 1 = all in one unit)."""
    x = np.sort(np.asarray(counts, dtype=float).ravel())
    if x.sum() == 0:
        return 0.0
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def top_share(counts: np.ndarray, top: float = 0.1) -> float:
    """Share of the total held by the top ``top`` fraction of units (at least one unit)."""
    x = np.sort(np.asarray(counts, dtype=float).ravel())[::-1]
    if x.sum() == 0:
        return 0.0
    return float(x[: max(1, round(top * len(x)))].sum() / x.sum())


@dataclass
class MaskComparison:
    """Storage, query and shared masks of one model and their statistics (fractions of the ranked parameters)."""

    storage: Mask
    query: Mask
    k: float

    @property
    def shared(self) -> Mask:
        return mask_and(self.storage, self.query)

    def stats(self, config: ModelOrConfig | None = None) -> dict:
        """Fractions, overlap and the random expectation; with ``config`` (the model or its config) also where the
        shared mask lies (:func:`localize`)."""
        shared = self.shared
        p, q = mask_fraction(self.storage), mask_fraction(self.query)
        out = {
            "k": self.k,
            "n_ranked": mask_size(shared),
            "storage_fraction": p,
            "query_fraction": q,
            "shared_count": mask_count(shared),
            "shared_fraction": mask_fraction(shared),
            "jaccard": jaccard(self.storage, self.query),
            "random_expectation": random_overlap(p, q),
        }
        out["shared_over_random"] = out["shared_fraction"] / max(out["random_expectation"]["shared_fraction"], 1e-12)
        if config is not None:
            loc = localize(shared, config)
            out["per_layer_fraction"] = (loc["per_layer"] / loc["per_layer_total"]).tolist()
            heads, neurons = loc["heads"], loc["neurons"]
            out["heads_gini"], out["heads_top10_share"] = gini(heads), top_share(heads, 0.1)
            out["neurons_gini"], out["neurons_top10_share"] = gini(neurons), top_share(neurons, 0.1)
        return out


# ------------------------------------------------------------------------------------------------ importances
def posthoc_importance(model, tokenizer, examples, *, batch_size: int = 16) -> dict[str, Tensor]:
    """Mean |per-example answer-loss gradient| over ``examples`` (one format) on a checkpoint, by HF name."""
    from mechrecall.gradients import gradient_stats

    return gradient_stats(model, tokenizer, examples, batch_size=batch_size).mean_abs


def update_importance(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """|after - before| per parameter (float32, CPU): the update of a stage, attributed to the format it trained."""
    missing = set(before) ^ set(after)
    if missing:
        raise ValueError(f"state dicts differ in parameters: {sorted(missing)[:4]}")
    return {n: (after[n].float().cpu() - before[n].float().cpu()).abs() for n in after}


def masked_cosines(
    grads_a: Mapping[str, Float[Tensor, "n ..."]], grads_b: Mapping[str, Float[Tensor, "n ..."]], mask: Mask
) -> dict[str, Float[Tensor, " n"]]:
    """Per-example cosine of two gradient sets restricted to ``mask`` (``inside``) and to its complement (``outside``).

    Computed in float32 where the gradients live; the cosines come back on the CPU.
    """

    def flat(grads, inside):
        parts = []
        for n, m in mask.items():
            keep = m.flatten().to(grads[n].device)
            parts.append(grads[n].flatten(1)[:, keep if inside else ~keep].float())
        return torch.cat(parts, 1)

    out = {}
    for where, inside in (("inside", True), ("outside", False)):
        a, b = flat(grads_a, inside), flat(grads_b, inside)
        out[where] = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-20).cpu()
    return out
