"""Activation patching, batched: many patches per forward, starting the forward at the patched layer.

Activation patching runs a *base* input (the run we intervene on; TransformerLens calls it "corrupted") and
overwrites one activation with its value from a *source* input (TL's "clean" run), then measures how the output
moves. If overwriting the residual stream of layer 3 at the subject token with the source's value makes the base
prompt answer the source fact, the fact is carried there. The classic experiment (ROME's "Eiffel Tower" causal
tracing) corrupts the subject embeddings with noise and restores one clean activation at a time.

mechrecall patches *between formats and facts*: the base is the query prompt of person B ("What is the birth city of
B?\\nAnswer:"), the source the storage prompt of person A ("A was born in"); positions are aligned by **role**
(``subject``, ``relation``, ``final``), not by index, because the formats differ in length. Every call is explicit about:

- **direction**: ``source`` is read, ``base`` is written (``denoise`` = restore a clean source into a corrupted
  base; ``noise`` = write a corrupted source into a clean base: swap the two arguments);
- **corruption**: optional :class:`GaussianNoise` on the base's subject embeddings (ROME);
- **site**: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (``[batch, pos, d_model]``) or
  ``head`` (one attention head's output before ``o_proj``, ``[batch, pos, head, d_head]``);
- **axes**: ``layer x pos`` (``pos`` = the named role positions given) or ``layer x head x pos`` for ``head``;
- **metric**: a name from :data:`METRICS` (answer log-prob, logit difference answer - foil, rank, top-1 hit) or
  any ``f(logits [rows, vocab], answer [rows], foil [rows]) -> [rows]``, read at each base row's ``readout`` position.

The generic function is :func:`activation_patch`; a setter (:data:`SETTERS`) writes the source value for one site.
Sweeps are batched: for a layer, the base batch is repeated once per patch variant (position, or head x position),
each copy gets its own patch, and the forward starts at that layer from the base run's cached residual stream (the
layers before it are identical for every variant). Metrics stay tensors (no per-patch ``.item()``). Results keep
every example: :class:`PatchResult` ``.values`` is ``[layer, (head,) pos, batch]`` with named axes and
``.to_dataframe()``.

Backends: ``"hf"`` (plain Hugging Face Llama-family decoder, the fast path described above, every site),
``"transformer_lens"`` (a raw-mode ``TransformerBridge``; batched ``run_with_hooks``, full forwards) and
``"nnsight"`` (a ``TransformersModel``; one batched trace per layer), the last two for the residual, attention and
MLP sites. Tests hold all three equal to each other and to TransformerLens's own ``get_act_patch_resid_pre``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

RESID_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SITES = (*RESID_SITES, "head")
Metric = Callable[[Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------------ metrics
def _logprob(logits, answer, foil):
    return logits.log_softmax(-1).gather(1, answer[:, None])[:, 0]


def _prob(logits, answer, foil):
    return logits.softmax(-1).gather(1, answer[:, None])[:, 0]


def _logit_diff(logits, answer, foil):
    return logits.gather(1, answer[:, None])[:, 0] - logits.gather(1, foil[:, None])[:, 0]


def _rank(logits, answer, foil):
    return (logits > logits.gather(1, answer[:, None])).sum(1).float()


def _hit(logits, answer, foil):
    return (logits.argmax(-1) == answer).float()


METRICS: dict[str, Metric] = {
    "logprob": _logprob,
    "prob": _prob,
    "logit_diff": _logit_diff,
    "rank": _rank,
    "hit": _hit,
}


def register_metric(name: str, fn: Metric) -> None:
    """Add a metric ``fn(logits [rows, vocab], answer [rows], foil [rows]) -> [rows]`` under ``name``."""
    METRICS[name] = fn


def get_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; registered: {sorted(METRICS)}")
    return METRICS[metric]


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class PatchInputs:
    """One side of a patching experiment: right-padded prompts and, per row, the positions that matter.

    ``positions[b, j]`` is row ``b``'s token position for the ``j``-th named position (``pos_labels[j]``, e.g. a
    role); ``readout[b]`` the position whose next-token logits the metric reads (the last prompt token);
    ``answer``/``foil`` the token ids the metric compares. Build them from facts with
    :func:`mechrecall.patching.prompts.fact_inputs`.
    """

    input_ids: Int[Tensor, "batch pos"]
    positions: Int[Tensor, "batch n_pos"]
    readout: Int[Tensor, " batch"]
    answer: Int[Tensor, " batch"]
    foil: Int[Tensor, " batch"]
    pos_labels: list[str]
    subject_positions: list[list[int]] = field(default_factory=list)  # every subject token (for corruption)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def all_positions(self) -> PatchInputs:
        """The same prompts with every token position as a named position (for equal-length prompts)."""
        T = self.input_ids.shape[1]
        return PatchInputs(self.input_ids, torch.arange(T).expand(len(self), -1).clone(), self.readout, self.answer,
                           self.foil, [str(i) for i in range(T)], self.subject_positions)  # fmt: skip


@dataclass
class GaussianNoise:
    """ROME's corruption: add N(0, (scale * std of the embedding matrix)^2) to the subject tokens' embeddings."""

    scale: float = 3.0
    seed: int = 0

    def noise(self, model, inputs: PatchInputs) -> Float[Tensor, "batch pos d_model"]:
        emb = model.get_input_embeddings().weight
        std = float(emb.detach().std())
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(*inputs.input_ids.shape, emb.shape[1], generator=g) * self.scale * std
        keep = torch.zeros(inputs.input_ids.shape, dtype=torch.bool)
        for b, ps in enumerate(inputs.subject_positions):
            keep[b, ps] = True
        return noise * keep[..., None]


# ------------------------------------------------------------------------------------------------ results
@dataclass
class PatchResult:
    """Per-example metric values of a sweep: ``values[layer, (head,) pos, batch]``; ``base``/``source`` unpatched."""

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list]
    base: Float[Tensor, " batch"]
    source: Float[Tensor, " batch"] | None
    site: str
    metric: str

    def mean(self) -> Tensor:
        return self.values.mean(-1)

    def effect(self) -> Tensor:
        """Patched minus unpatched base value, per example."""
        return self.values - self.base

    def normalized(self) -> Tensor:
        """(patched - base) / (source - base), per example: 0 = no effect, 1 = the source's own value."""
        if self.source is None:
            raise ValueError("no source value recorded (source prompts differ in format: give source_readout)")
        return (self.values - self.base) / (self.source - self.base)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (patch, example): axis labels, example index, value, base value, effect."""
        idx = torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]).reshape(-1, self.values.ndim)
        df = pd.DataFrame({a: [self.labels[a][i] for i in idx[:, k].tolist()] for k, a in enumerate(self.axes)})
        df["value"] = self.values.reshape(-1).tolist()
        df["base"] = self.base[idx[:, -1]].tolist()
        df["effect"] = df["value"] - df["base"]
        df["site"], df["metric"] = self.site, self.metric
        return df


# ------------------------------------------------------------------------------------------------ setters
def set_resid(act: Tensor, rows: Tensor, pos: Tensor, value: Tensor, head: Tensor | None = None) -> Tensor:
    """``act[rows[i], pos[i]] = value[i]`` on a ``[rows, pos, d]`` activation (residual, attn_out, mlp_out)."""
    act = act.clone()
    act[rows, pos] = value.to(act.dtype)
    return act


def set_head(act: Tensor, rows: Tensor, pos: Tensor, value: Tensor, head: Tensor | None = None) -> Tensor:
    """``z[rows[i], pos[i], head[i]] = value[i]`` on ``o_proj``'s input viewed as ``[rows, pos, head, d_head]``."""
    n_rows, n_pos, width = act.shape
    z = act.clone().view(n_rows, n_pos, -1, value.shape[-1])
    z[rows, pos, head] = value.to(act.dtype)
    return z.view(n_rows, n_pos, width)


SETTERS = {s: set_resid for s in RESID_SITES} | {"head": set_head}


# ------------------------------------------------------------------------------------------------ HF capture
def _layers(model):
    return model.model.layers


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def capture(
    model,
    input_ids: Tensor,
    site: str,
    *,
    embed_noise: Tensor | None = None,
    readout: Tensor | None = None,
    kv: list | None = None,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(site activation per layer, resid_pre per layer, logits) of one plain-HF forward.

    Logits are ``[batch, pos, vocab]``, or ``[batch, vocab]`` at one ``readout`` position per row if given (the
    unembedding of the other positions is skipped: with a large vocabulary it costs as much as several layers).
    A list passed as ``kv`` receives every layer's (keys, values), for forwards that reuse the prefix.
    """
    acts: list = [None] * len(_layers(model))
    pre: list = [None] * len(_layers(model))
    handles = []
    if embed_noise is not None:
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + embed_noise))
    for i, layer in enumerate(_layers(model)):
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: pre.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach()),
                with_kwargs=True,
            )
        )
        module, kind = _site_module(layer, site)
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(i, a[0].detach())))
        else:
            handles.append(
                module.register_forward_hook(lambda m, a, out, i=i: acts.__setitem__(i, _first(out).detach()))
            )
    try:
        if readout is None:
            logits = model(input_ids=input_ids).logits
        else:
            res = model.model(input_ids=input_ids, use_cache=kv is not None)
            hidden = res.last_hidden_state  # after the final norm
            logits = model.lm_head(hidden[torch.arange(hidden.shape[0]), readout])
            if kv is not None:
                kv.extend((layer.keys, layer.values) for layer in res.past_key_values.layers)
    finally:
        for h in handles:
            h.remove()
    if site == "resid_mid":
        acts = [p + a for p, a in zip(pre, acts)]  # resid_mid = resid_pre + attention output
    return acts, pre, logits


def _site_module(layer, site: str):
    """(module, 'pre'|'post') whose input or output is the site (resid_mid is read as attn output + resid_pre)."""
    return {
        "resid_pre": (layer, "pre"),
        "resid_post": (layer, "post"),
        "resid_mid": (layer.self_attn, "post"),
        "attn_out": (layer.self_attn, "post"),
        "mlp_out": (layer.mlp, "post"),
        "head": (layer.self_attn.o_proj, "pre"),
    }[site]


def _gather_source(act: Tensor, positions: Tensor, site: str, n_heads: int) -> Tensor:
    """Source values at each row's named positions: ``[batch, n_pos, d]`` (or ``[batch, n_pos, head, d_head]``)."""
    b = torch.arange(act.shape[0])[:, None]
    vals = act[b, positions]
    return vals.view(*vals.shape[:2], n_heads, -1) if site == "head" else vals


# ------------------------------------------------------------------------------------------------ the sweep
def _variants(n_pos: int, n_heads: int | None) -> tuple[Tensor, Tensor | None]:
    """Patch variants of one layer: position index per variant (and head index for head patching)."""
    if n_heads is None:
        return torch.arange(n_pos), None
    grid = torch.cartesian_prod(torch.arange(n_heads), torch.arange(n_pos))
    return grid[:, 1], grid[:, 0]


@torch.no_grad()
def _run_from_layer(
    model,
    hidden: Tensor,
    start: int,
    site: str,
    patch: Callable | None,
    readout: Tensor,
    offset: int = 0,
    past: list | None = None,
) -> Tensor:
    """Run layers ``start..`` from ``hidden`` (resid_pre of ``start`` at positions ``offset..``), applying ``patch``
    at the site of ``start``; return logits at ``readout`` (one position per row, relative to ``offset``).

    ``past``: per layer (keys, values) of positions ``< offset`` (unchanged by a patch at or after ``offset``, since
    attention is causal), so the forward computes only the suffix."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    rows, n_pos = hidden.shape[:2]
    pos_ids = torch.arange(offset, offset + n_pos)[None].expand(rows, -1)
    cache = DynamicCache(ddp_cache_data=past, config=model.config) if past is not None else None
    mask = create_causal_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=None, past_key_values=cache, position_ids=pos_ids
    )
    pe = model.model.rotary_emb(hidden, pos_ids)
    layers = _layers(model)
    handle = None
    if patch is not None and site != "resid_pre":
        layer = layers[start]
        module, kind = _site_module(layer, site)
        if site == "resid_post":
            handle = module.register_forward_hook(lambda m, a, out: patch(_first(out)))
        elif site == "resid_mid":  # write attn_out := target - resid_pre so that resid_mid = target
            base_pre = hidden

            def hook(m, a, out):
                attn = _first(out)
                new = patch(base_pre + attn) - base_pre
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handle = module.register_forward_hook(hook)
        elif kind == "pre":
            handle = module.register_forward_pre_hook(lambda m, a: (patch(a[0]), *a[1:]))
        else:
            handle = module.register_forward_hook(
                lambda m, a, out: (patch(_first(out)), *out[1:]) if isinstance(out, tuple) else patch(out)
            )
    elif patch is not None:
        hidden = patch(hidden)
    # the last layer only matters at the readout positions: its MLP runs there alone (unless it holds the patch)
    fast_last = start < len(layers) - 1 or site == "resid_pre"
    try:
        h = hidden
        for i, layer in enumerate(layers[start:], start):
            if fast_last and i == len(layers) - 1:
                last = _last_layer_at(layer, h, readout, mask, pos_ids, pe, cache)
                break
            h = _first(
                layer(h, attention_mask=mask, position_ids=pos_ids, position_embeddings=pe, past_key_values=cache)
            )
        else:
            last = h[torch.arange(rows), readout]
    finally:
        if handle is not None:
            handle.remove()
    return model.lm_head(model.model.norm(last))


def _last_layer_at(layer, h: Tensor, readout: Tensor, mask, pos_ids, pe, cache=None) -> Tensor:
    """A Llama decoder layer's output at one position per row: attention over the whole prefix, MLP at the readout."""
    attn = _first(
        layer.self_attn(
            hidden_states=layer.input_layernorm(h),
            attention_mask=mask,
            position_ids=pos_ids,
            position_embeddings=pe,
            past_key_values=cache,
        )
    )
    rows = torch.arange(h.shape[0])
    mid = h[rows, readout] + attn[rows, readout]
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


def activation_patch(
    model,
    base: PatchInputs,
    source: PatchInputs,
    *,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    metric: str | Metric = "logit_diff",
    corruption: GaussianNoise | None = None,
    backend: str = "hf",
    max_rows: int = 2048,
    prefix_groups: int | None = None,
) -> PatchResult:
    """Patch ``source``'s ``site`` activation into ``base`` at every (layer, named position) [x head], batched.

    Row ``b`` of ``source`` patches row ``b`` of ``base``: position ``base.positions[b, j]`` receives the source
    activation at ``source.positions[b, j]`` (role alignment). ``corruption`` adds noise to the base's subject
    embeddings first (ROME tracing: then ``source`` is usually the same prompts, clean). ``max_rows`` bounds the rows
    of one forward. ``prefix_groups > 1`` also reuses the base run's keys and values: variants are split into that
    many groups by target position and each group's forward computes only the positions from its earliest target
    on (attention is causal, so earlier positions are unchanged by the patch); worth it for deep models and long
    prompts, where compute dominates. ``None`` (default) picks 4 for models of 8+ layers, else 1 (measured in
    ``benchmarks/patching_sweep.py``: SmolLM2-135M 1.4x faster with 4 groups, slower with 8 or 16; a 2-layer model
    gains nothing). ``model`` is a plain HF
    model for ``backend="hf"``, a ``TransformerBridge`` for ``"transformer_lens"``, an nnsight model for ``"nnsight"``.
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if len(base) != len(source) or base.positions.shape != source.positions.shape:
        raise ValueError("base and source need the same number of rows and named positions (pair them row by row)")
    fn = get_metric(metric)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    if backend != "hf":
        from mechrecall.patching.backends import activation_patch_backend

        return activation_patch_backend(
            model, base, source, site=site, layers=layers, metric=fn, metric_name=metric_name, backend=backend,
            corruption=corruption,
        )  # fmt: skip
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    layers = list(range(n_layers)) if layers is None else [range(n_layers)[L] for L in layers]
    noise = corruption.noise(model, base) if corruption is not None else None
    if prefix_groups is None:
        prefix_groups = 4 if n_layers >= 8 else 1
    kv: list | None = [] if prefix_groups > 1 else None
    _, base_pre, base_logits = capture(
        model, base.input_ids, "resid_pre", embed_noise=noise, readout=base.readout, kv=kv
    )
    src_acts, _, src_logits = capture(model, source.input_ids, site, readout=source.readout)
    base_val = fn(base_logits, base.answer, base.foil)
    src_val = fn(src_logits, source.answer, source.foil)
    pos_idx, head_idx = _variants(base.positions.shape[1], n_heads if site == "head" else None)
    n_var, B = len(pos_idx), len(base)
    out = torch.empty(len(layers), n_var, B)
    # chunks of variants; with prefix reuse, variants sorted by their earliest target position and split into
    # ``prefix_groups`` chunks, each starting its forward at its own earliest target position
    order = torch.argsort(base.positions.min(0).values[pos_idx], stable=True)
    per_chunk = max(1, max_rows // B)
    if prefix_groups > 1:
        per_chunk = min(per_chunk, -(-n_var // prefix_groups))
    chunks = [order[v0 : v0 + per_chunk] for v0 in range(0, n_var, per_chunk)]
    for li, L in enumerate(layers):
        values = _gather_source(src_acts[L], source.positions, site, n_heads)  # [B, n_pos, ...]
        for vs in chunks:
            # rows are variant-major: row = v * B + b
            rows = torch.arange(len(vs) * B)
            b_of = rows % B
            p_of = pos_idx[vs].repeat_interleave(B)
            tgt_pos = base.positions[b_of, p_of]
            if site == "head":
                h_of = head_idx[vs].repeat_interleave(B)
                val = values[b_of, p_of, h_of]
            else:
                h_of, val = None, values[b_of, p_of]

            p0 = int(tgt_pos.min()) if kv is not None else 0
            past = [(k[b_of, :, :p0], v[b_of, :, :p0]) for k, v in kv] if kv is not None and p0 > 0 else None
            p0 = p0 if past is not None else 0

            def patch(act, rows=rows, tgt_pos=tgt_pos - p0, val=val, h_of=h_of):
                return SETTERS[site](act, rows, tgt_pos, val, h_of)

            hidden = base_pre[L][b_of, p0:]
            logits = _run_from_layer(model, hidden, L, site, patch, base.readout[b_of] - p0, p0, past)
            out[li, vs] = fn(logits, base.answer[b_of], base.foil[b_of]).view(len(vs), B)
    if site == "head":
        values = out.view(len(layers), n_heads, base.positions.shape[1], B)
        axes = ("layer", "head", "pos", "example")
        labels = {"layer": layers, "head": list(range(n_heads)), "pos": base.pos_labels, "example": list(range(B))}
    else:
        values, axes = out, ("layer", "pos", "example")
        labels = {"layer": layers, "pos": base.pos_labels, "example": list(range(B))}
    return PatchResult(values, axes, labels, base_val, src_val, site, metric_name)


def full_patch_logits(model, base: PatchInputs, source: PatchInputs, site: str = "resid_pre") -> Tensor:
    """Logits at the base readout after patching *every* position of every layer's ``site`` from a same-length
    source. For the residual sites this reproduces the source run's logits (a sanity check); for ``attn_out`` /
    ``mlp_out`` the rest of the base's residual stream remains."""
    if site not in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        raise ValueError(f"full patching supports resid_pre, resid_post, attn_out, mlp_out, not {site!r}")
    if base.input_ids.shape != source.input_ids.shape:
        raise ValueError("full patching needs base and source of the same shape")
    src_acts, _, _ = capture(model, source.input_ids, site)
    handles = []
    for i, layer in enumerate(_layers(model)):
        module, kind = _site_module(layer, site)
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(lambda m, a, kw, i=i: ((src_acts[i], *a[1:]), kw) if a else (a, {**kw, "hidden_states": src_acts[i]}), with_kwargs=True))  # fmt: skip
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, i=i: (src_acts[i], *out[1:]) if isinstance(out, tuple) else src_acts[i]))  # fmt: skip
    try:
        with torch.no_grad():
            logits = model(input_ids=base.input_ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits[torch.arange(len(base)), base.readout]
