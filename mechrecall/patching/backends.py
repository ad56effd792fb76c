"""The same batched sweep through TransformerLens hooks and nnsight (full forwards; parity with the HF fast path).

Sites: ``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out`` (TL hook names ``blocks.L.hook_<site>``; nnsight
``model.layers[L]`` input / output, ``self_attn.output[0]``, ``mlp.output``). Each layer is one forward of the base
batch repeated once per named position, copy ``j`` patched at position ``j``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mechrecall.patching.core import PatchInputs, PatchResult

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
        out[li] = fn(logits[rows, base.readout[b_of]], base.answer[b_of], base.foil[b_of]).view(n_pos, len(base))
    return out, base_logits, src_logits


def _nn_site(model, L: int, site: str):
    layer = model.model.layers[L]
    return {
        "resid_pre": lambda: layer.input,
        "resid_post": lambda: layer.output,
        "attn_out": lambda: layer.self_attn.output[0],
        "mlp_out": lambda: layer.mlp.output,
    }[site]()


@torch.no_grad()
def _nnsight_sweep(model, base, source, site, layers, fn):
    saved = []
    with model.trace(source.input_ids):
        for L in layers:
            saved.append(_nn_site(model, L, site).save())
        src_logits = model.lm_head.output.save()
    with model.trace(base.input_ids):
        base_logits = model.lm_head.output.save()
    n_pos = base.positions.shape[1]
    rows, b_of, p_of = _rows(base, n_pos)
    tgt = base.positions[b_of, p_of]
    out = torch.empty(len(layers), n_pos, len(base))
    for li, L in enumerate(layers):
        val = saved[li][b_of, source.positions[b_of, p_of]]
        with model.trace(base.input_ids[b_of]):
            _nn_site(model, L, site)[rows, tgt] = val
            logits = model.lm_head.output.save()
        out[li] = fn(logits[rows, base.readout[b_of]], base.answer[b_of], base.foil[b_of]).view(n_pos, len(base))
    return out, base_logits, src_logits


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
        n_layers = len(model.model.layers)
        sweep = _nnsight_sweep
    else:
        raise ValueError(f"unknown backend {backend!r}; expected 'hf', 'transformer_lens' or 'nnsight'")
    layers = list(range(n_layers)) if layers is None else [range(n_layers)[L] for L in layers]
    out, base_logits, src_logits = sweep(model, base, source, site, layers, metric)
    b = torch.arange(len(base))
    base_val = metric(_t(base_logits)[b, base.readout], base.answer, base.foil)
    src_val = metric(_t(src_logits)[b, source.readout], source.answer, source.foil)
    labels = {"layer": layers, "pos": base.pos_labels, "example": list(range(len(base)))}
    return PatchResult(out, ("layer", "pos", "example"), labels, base_val, src_val, site, metric_name)


def _t(x) -> Tensor:
    return x.logits if hasattr(x, "logits") else x
