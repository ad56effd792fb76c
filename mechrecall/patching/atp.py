"""Attribution patching (AtP): a first-order estimate of every (layer, position) patch from 2 forwards + 1 backward.

``estimate[L, j, b] = (a_source - a_base) . d metric / d a_base`` at base position ``positions[b, j]`` of site ``L``,
with the gradient taken on the **base** run (the run being patched). It is exact for a metric linear in the
activation and a screen otherwise: residual-stream AtP between formats can be far off (the patched vector is large).
:func:`check_attribution` compares a screen with exact patching of the same cells (Pearson r, relative error of the
sum: the completeness check), :func:`validate_top_k` re-runs exact patching on the top cells only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechrecall import arch
from mechrecall.devices import model_device
from mechrecall.patching.core import (
    PatchInputs,
    PatchResult,
    _gather_source,
    _metrics,
    activation_patch,
    capture,
    get_metric,
    metric_on,
    n_read,
    read_positions,
)

__all__ = [
    "ATP_SITES",
    "attribution_patch",
    "check_attribution",
    "validate_top_k",
]

ATP_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def attribution_patch(
    model, base: PatchInputs, source: PatchInputs, *, site: str = "resid_pre", metric="logit_diff"
) -> PatchResult:
    if site not in ATP_SITES:
        raise ValueError(f"attribution patching supports {ATP_SITES}, not {site!r}")
    fn = get_metric(metric)
    k_src = n_read([fn], source)
    src_acts, _, src_logits = capture(
        model, source.input_ids, site, readout=source.span(k_src) if k_src > 1 else source.readout
    )
    dev = model_device(model)
    n_layers = arch.n_layers(model)
    acts: list = [None] * n_layers

    def keep(t, i):
        t.retain_grad()
        acts[i] = t

    # resid_mid: the input of the module after attention is the resid_mid tensor itself (the residual path too)
    handles = [arch.hook_site(model, i, site, lambda t, i=i: keep(t, i)) for i in range(n_layers)]
    emb_hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = model(input_ids=base.input_ids.to(dev)).logits
            b = torch.arange(len(base), device=dev)
            span = base.span(n_read([fn], base)).to(dev)
            values = metric_on(fn, read_positions(logits, b, span).float(), base)
            values.sum().backward()
    finally:
        for h in handles:
            h.remove()
        emb_hook.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    n_heads = arch.dims(model).n_heads
    est = []
    rows = torch.arange(len(base), device=dev)[:, None]
    pos = base.positions.to(dev)
    for i in range(len(acts)):
        src = _gather_source(src_acts[i], source.positions, site, n_heads)  # [B, n_pos, d]
        a = acts[i].detach()[rows, pos]
        g = acts[i].grad[rows, pos]
        est.append(((src - a).float() * g.float()).sum(-1).T.cpu())  # [n_pos, B]
    (src_val,) = _metrics([fn], src_logits, source)
    values = values.detach().cpu()
    labels = {"layer": list(range(len(acts))), "pos": base.pos_labels, "example": list(range(len(base)))}
    return PatchResult(
        values + torch.stack(est), ("layer", "pos", "example"), labels, values, src_val, site,
        f"atp:{metric if isinstance(metric, str) else 'custom'}",
    )  # fmt: skip


def check_attribution(estimate: PatchResult, exact: PatchResult) -> dict:
    """How well the AtP screen predicts exact patching on the same cells (effects = patched - base, per example)."""
    e, x = estimate.effect().flatten(), exact.effect().flatten()
    r = float(torch.corrcoef(torch.stack([e, x]))[0, 1]) if e.std() > 0 and x.std() > 0 else float("nan")
    return {
        "pearson_r": r,
        "sum_estimate": float(e.sum()),
        "sum_exact": float(x.sum()),
        "relative_error_of_sum": float((e.sum() - x.sum()).abs() / x.sum().abs().clamp_min(1e-12)),
        "max_abs_error": float((e - x).abs().max()),
    }


def validate_top_k(
    model, base: PatchInputs, source: PatchInputs, estimate: PatchResult, k: int = 5, *, metric="logit_diff"
) -> list[dict]:
    """Exact patching of the ``k`` cells with the largest mean |estimated effect| (only their layers are run)."""
    mean_eff = estimate.effect().mean(-1)  # [layer, pos]
    flat = torch.argsort(mean_eff.abs().flatten(), descending=True)[:k]
    cells = [(int(i) // mean_eff.shape[1], int(i) % mean_eff.shape[1]) for i in flat]
    layers: Sequence[int] = sorted({estimate.labels["layer"][li] for li, _ in cells})
    exact = activation_patch(model, base, source, site=estimate.site, layers=layers, metric=metric)
    out = []
    for li, pj in cells:
        L = estimate.labels["layer"][li]
        ex = exact.effect()[layers.index(L), pj].mean()
        out.append(
            {"layer": L, "pos": estimate.labels["pos"][pj], "estimate": float(mean_eff[li, pj]), "exact": float(ex)}
        )
    return out
