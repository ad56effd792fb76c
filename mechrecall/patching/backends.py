"""The same batched sweep through TransformerLens hooks and nnsight (full forwards; parity with the HF fast path).

Sites: ``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out`` (TL hook names ``blocks.L.hook_<site>``; nnsight: the
modules :mod:`mechrecall.arch` names for the wrapped model -- block input / output, attention output ``[0]``, MLP
output). Each layer is one forward of the base
batch repeated once per named position, copy ``j`` patched at position ``j``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mechrecall import arch
from mechrecall.patching.inputs import PatchInputs, PatchResult, metric_on, n_read, read_positions

__all__ = [
    "BACKEND_SITES",
    "activation_patch_backend",
]

BACKEND_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def _rows(base: PatchInputs, n_pos: int):
    B = len(base)
    rows = torch.arange(n_pos * B)
    b_of, p_of = rows % B, torch.arange(n_pos).repeat_interleave(B)
    return rows, b_of, p_of


@torch.no_grad()
def _tl_sweep(bridge, base, source, site, layers, fn):
    names = [f"blocks.{L}.hook_{site}" for L in layers]
    src_logits, cache = bridge.run_with_cache(source.input_ids, names_filter=lambda n: n in names)
    base_logits = bridge(base.input_ids)
    n_pos = base.positions.shape[1]
    rows, b_of, p_of = _rows(base, n_pos)
    tgt = base.positions[b_of, p_of]
    out = torch.empty(len(layers), n_pos, len(base))
    for li, L in enumerate(layers):
        val = cache[f"blocks.{L}.hook_{site}"][b_of, source.positions[b_of, p_of]]

        def hook(act, hook, val=val):
            act = act.clone()
            act[rows, tgt] = val
            return act

        logits = bridge.run_with_hooks(base.input_ids[b_of], fwd_hooks=[(f"blocks.{L}.hook_{site}", hook)])
        out[li] = _read_metric(fn, logits, rows, base, b_of).view(n_pos, len(base))
    return out, base_logits, src_logits


def _envoy(model, dotted: str):
    """The nnsight envoy at an HF dotted module path (nnsight mirrors the wrapped model's module tree)."""
    node = model
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _nn_first(x):
    return x[0] if isinstance(x, tuple) else x


class _NnSite:
    """Read and write one site of one block inside an nnsight trace (where the HF module tree puts it)."""

    def __init__(self, model, L: int, site: str):
        spec = arch.spec_of(model._module)
        block = _envoy(model, f"{spec.blocks}.{L}")
        self.site = site
        self.module = {"resid_pre": block, "resid_post": block, "attn_out": _envoy(block, spec.attn),
                       "mlp_out": _envoy(block, spec.mlp)}[site]  # fmt: skip

    def get(self):
        return self.module.input if self.site == "resid_pre" else _nn_first(self.module.output)

    def set(self, rows, tgt, val) -> None:
        if self.site == "resid_pre":
            self.module.input[rows, tgt] = val
        elif isinstance(self.module.output, tuple):
            self.module.output[0][rows, tgt] = val
        else:
            self.module.output[rows, tgt] = val


def _nn_logits(model):
    """The unembedding's output inside a trace (soft-capped afterwards by :func:`_capped`, as the model's forward)."""
    return _envoy(model, arch.spec_of(model._module).unembed).output


def _capped(model, logits: Tensor) -> Tensor:
    return arch.softcap_logits(model._module, logits)


@torch.no_grad()
def _nnsight_sweep(model, base, source, site, layers, fn):
    saved = []
    with model.trace(source.input_ids):
        for L in layers:
            saved.append(_NnSite(model, L, site).get().save())
        src_logits = _nn_logits(model).save()
    with model.trace(base.input_ids):
        base_logits = _nn_logits(model).save()
    n_pos = base.positions.shape[1]
    rows, b_of, p_of = _rows(base, n_pos)
    tgt = base.positions[b_of, p_of]
    out = torch.empty(len(layers), n_pos, len(base))
    for li, L in enumerate(layers):
        val = saved[li][b_of, source.positions[b_of, p_of]]
        with model.trace(base.input_ids[b_of]):
            _NnSite(model, L, site).set(rows, tgt, val)
            logits = _nn_logits(model).save()
        out[li] = _read_metric(fn, _capped(model, logits), rows, base, b_of).view(n_pos, len(base))
    return out, _capped(model, base_logits), _capped(model, src_logits)


def activation_patch_backend(
    model,
    base: PatchInputs,
    source: PatchInputs,
    *,
    site: str,
    layers: Sequence[int] | None,
    metric,
    metric_name: str,
    backend: str,
    corruption=None,
) -> PatchResult:
    if site not in BACKEND_SITES:
        raise ValueError(f"backend {backend!r} patches {BACKEND_SITES}; use backend='hf' for {site!r}")
    if corruption is not None:
        raise ValueError(f"corruption runs on backend 'hf' only (asked for {backend!r})")
    if backend == "transformer_lens":
        n_layers = model.cfg.n_layers
        sweep = _tl_sweep
    elif backend == "nnsight":
        n_layers = arch.n_layers(model._module)
        sweep = _nnsight_sweep
    else:
        raise ValueError(f"unknown backend {backend!r}; expected 'hf', 'transformer_lens' or 'nnsight'")
    layers = list(range(n_layers)) if layers is None else [range(n_layers)[L] for L in layers]
    out, base_logits, src_logits = sweep(model, base, source, site, layers, metric)
    b = torch.arange(len(base))
    base_val = _read_metric(metric, _t(base_logits), b, base, b)
    src_val = _read_metric(metric, _t(src_logits), b, source, b)
    labels = {"layer": layers, "pos": base.pos_labels, "example": list(range(len(base)))}
    return PatchResult(out, ("layer", "pos", "example"), labels, base_val, src_val, site, metric_name)


def _read_metric(fn, logits: Tensor, rows: Tensor, inputs: PatchInputs, b_of: Tensor) -> Tensor:
    """``fn`` on full-forward ``logits [rows, pos, vocab]`` read at row ``b_of``'s readout (or answer span)."""
    span = inputs.span(n_read([fn], inputs))[b_of]
    return metric_on(fn, read_positions(logits, rows, span), inputs, b_of).cpu()


def _t(x) -> Tensor:
    return x.logits if hasattr(x, "logits") else x
