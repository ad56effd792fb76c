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
  ``head`` (one attention head's output before the attention output projection, ``[batch, pos, head, d_head]``);
- **axes**: ``layer x pos`` (``pos`` = the named role positions given) or ``layer x head x pos`` for ``head``;
- **metric**: a name from :data:`METRICS` or any ``f(logits [rows, vocab], answer [rows], foil [rows]) -> [rows]``,
  read at each base row's ``readout`` position: first-token metrics (answer log-prob, logit difference answer -
  foil, rank, top-1 hit), or whole-answer metrics (``answer_logprob``: the summed log-probability of every answer
  token, teacher-forced; ``answer_match``: every answer token is the argmax), which read every answer-predicting
  position of inputs built with ``whole_answer=True`` (:func:`register_metric` ``whole_answer=True`` for your own).

The generic function is :func:`activation_patch`; a setter (:data:`SETTERS`) writes the source value for one site.
Sweeps are batched: every (layer, variant, example) patch of a sweep is one row of a single ragged forward that
enters the stack at the patched layer and computes only the tokens from the patched position to the readout, on the
base run's cached residual stream, keys and values (everything else is unchanged by the patch: attention is causal).
Metrics stay tensors (no per-patch ``.item()``). Results keep
every example: :class:`PatchResult` ``.values`` is ``[layer, (head,) pos, batch]`` with named axes and
``.to_dataframe()``.

Backends: ``"hf"`` (a plain Hugging Face causal LM of any architecture :mod:`mechrecall.arch` knows, every site):
Llama, Mistral, Qwen2 and Qwen3 take the ragged fast path described above; the other architectures (GPT-NeoX, GPT-2,
Gemma 2/3, OLMo2, Phi-3) an exact hooked path (every patch a row of a batched whole-prompt forward with one hook on
the site, logits at the readout only). ``"transformer_lens"`` (a raw-mode ``TransformerBridge``; batched
``run_with_hooks``, full forwards) and ``"nnsight"`` (a ``TransformersModel``; one batched trace per layer) cover the
residual, attention and MLP sites. Tests hold all of them equal to each other, to whole-prompt hooked forwards patch by
patch on every architecture, and to TransformerLens's own ``get_act_patch_resid_pre``.

Everything runs on the model's device and dtype; metric values are computed in float32 and come back on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechrecall import arch
from mechrecall.devices import model_device
from mechrecall.patching.inputs import (  # (re-exported: part of this module's interface)
    METRICS,
    WHOLE_ANSWER_METRICS,
    GaussianNoise,
    Metric,
    PatchInputs,
    PatchResult,
    get_metric,
    is_whole_answer,
    metric_on,
    n_read,
    read_positions,
    register_metric,
)

__all__ = [
    "RESID_SITES",
    "SITES",
    "Metric",
    "METRICS",
    "WHOLE_ANSWER_METRICS",
    "register_metric",
    "is_whole_answer",
    "get_metric",
    "PatchInputs",
    "n_read",
    "read_positions",
    "metric_on",
    "GaussianNoise",
    "PatchResult",
    "set_resid",
    "set_head",
    "SETTERS",
    "capture",
    "activation_patch",
    "full_patch_logits",
]

RESID_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SITES = (*RESID_SITES, "head")


def set_resid(act: Tensor, tok: Tensor, value: Tensor, head: Tensor | None = None) -> Tensor:
    """``act[tok[i]] = value[i]`` on a packed ``[tokens, d]`` activation (residual, attn_out, mlp_out)."""
    act = act.clone()
    act[tok] = value.to(act.dtype)
    return act


def set_head(act: Tensor, tok: Tensor, value: Tensor, head: Tensor | None = None) -> Tensor:
    """``z[tok[i], head[i]] = value[i]`` on the attention output projection's packed input ``[tokens, head * d_head]``."""
    n_tok, width = act.shape
    z = act.clone().view(n_tok, -1, value.shape[-1])
    z[tok, head] = value.to(act.dtype)
    return z.view(n_tok, width)


SETTERS = {s: set_resid for s in RESID_SITES} | {"head": set_head}


# ------------------------------------------------------------------------------------------------ HF capture
def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _metrics(fns, logits: Tensor, inputs: PatchInputs, idx: Tensor | None = None) -> list[Tensor]:
    """Metric values in float32 on the CPU (logits may be bf16 on a GPU) for ``inputs``' rows ``idx``."""
    logits = logits.float()
    return [metric_on(fn, logits, inputs, idx).cpu() for fn in fns]


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
    """(site activation per layer, resid_pre per layer, logits) of one plain-HF forward, on the model's device.

    Logits are ``[batch, pos, vocab]``, or ``[batch, vocab]`` at one ``readout`` position per row if given, or
    ``[batch, k, vocab]`` at a ``readout`` span ``[batch, k]`` (the unembedding of the other positions is skipped:
    with a large vocabulary it costs as much as several layers).
    A list passed as ``kv`` receives every layer's (keys, values), for forwards that reuse the prefix.
    """
    dev = model_device(model)
    n = arch.n_layers(model)
    acts: list = [None] * n
    pre: list = [None] * n
    handles = []
    if embed_noise is not None:
        noise = embed_noise.to(dev)
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + noise.to(out.dtype)))
    for i in range(n):
        handles.append(arch.hook_site(model, i, "resid_pre", lambda t, i=i: pre.__setitem__(i, t.detach())))
        if site != "resid_pre":
            handles.append(arch.hook_site(model, i, site, lambda t, i=i: acts.__setitem__(i, t.detach())))
    try:
        ids = input_ids.to(dev)
        if readout is None:
            logits = model(input_ids=ids).logits
        else:
            res = arch.base_model(model)(input_ids=ids, use_cache=kv is not None)
            hidden = res.last_hidden_state  # after the final norm
            rows = torch.arange(hidden.shape[0], device=dev)
            at = hidden[rows, readout.to(dev)] if readout.dim() == 1 else read_positions(hidden, rows, readout.to(dev))
            logits = arch.normed_to_logits(model, at)
            if kv is not None:
                kv.extend((layer.keys, layer.values) for layer in res.past_key_values.layers)
    finally:
        for h in handles:
            h.remove()
    if site == "resid_pre":
        acts = list(pre)
    return acts, pre, logits


def _gather_source(act: Tensor, positions: Tensor, site: str, n_heads: int) -> Tensor:
    """Source values at each row's named positions: ``[batch, n_pos, d]`` (or ``[batch, n_pos, head, d_head]``)."""
    b = torch.arange(act.shape[0], device=act.device)[:, None]
    vals = act[b, positions.to(act.device)]
    return vals.view(*vals.shape[:2], n_heads, -1) if site == "head" else vals


# ------------------------------------------------------------------------------------------------ the sweep
def _variants(n_pos: int, n_heads: int | None) -> tuple[Tensor, Tensor | None]:
    """Patch variants of one layer: position index per variant (and head index for head patching)."""
    if n_heads is None:
        return torch.arange(n_pos), None
    grid = torch.cartesian_prod(torch.arange(n_heads), torch.arange(n_pos))
    return grid[:, 1], grid[:, 0]


@dataclass
class _Rows:
    """Patch rows of one forward, sorted by layer: example, layer, target position, (head,) value."""

    b: Tensor
    layer: Tensor
    pos: Tensor
    head: Tensor | None
    value: Tensor


@dataclass
class _Sweep:
    """Every patch of a sweep, layer-major then variant then example: flat index ``(layer * n_var + var) * B + b``.

    ``value`` is the source activation each patch writes and ``current`` the base activation it replaces (both on the
    model's device); ``live`` marks the patches that can change the metric.
    """

    b: Tensor
    layer: Tensor
    tgt: Tensor
    head: Tensor | None
    value: Tensor
    live: Tensor

    def rows(self, idx: Tensor) -> _Rows:
        return _Rows(self.b[idx], self.layer[idx], self.tgt[idx], None if self.head is None else self.head[idx],
                     self.value[idx])  # fmt: skip


def _sweep_table(base, source, site, layers, n_layers, n_heads, base_acts, src_acts, skip_identical) -> _Sweep:
    """The (layer, variant, example) patches of a sweep, their source values and which of them can matter."""
    pos_idx, head_idx = _variants(base.positions.shape[1], n_heads if site == "head" else None)
    n_var, B = len(pos_idx), len(base)
    li, var, b = torch.cartesian_prod(torch.arange(len(layers)), torch.arange(n_var), torch.arange(B)).unbind(1)
    L = torch.tensor(layers)[li]
    j = pos_idx[var]
    tgt, spos = base.positions[b, j], source.positions[b, j]
    value = torch.stack(src_acts)[L, b, spos]
    current = torch.stack(base_acts)[L, b, tgt]
    head = None
    if site == "head":
        head = head_idx[var]
        r = torch.arange(len(b))
        value, current = value.view(len(b), n_heads, -1)[r, head], current.view(len(b), n_heads, -1)[r, head]
    live = tgt <= base.readout[b]
    if site != "resid_pre":  # after attention in the last layer, only the readout token reaches the metric
        live &= (L < n_layers - 1) | (tgt == base.readout[b])
    if skip_identical:
        live &= ~(value == current).all(-1).cpu()
    return _Sweep(b, L, tgt, head, value, live)


def _chunks(sizes: list[int], max_rows: int, max_tokens: int):
    """Consecutive (start, stop) ranges of at most ``max_rows`` rows and ``max_tokens`` tokens (one row at least)."""
    start, n_rows, n_toks = 0, 0, 0
    for i, t in enumerate([*sizes, None]):
        if t is not None and n_rows < max_rows and (n_toks + t <= max_tokens or n_rows == 0):
            n_rows, n_toks = n_rows + 1, n_toks + t
            continue
        if n_rows:
            yield start, i
        start, n_rows, n_toks = i, 1, t or 0


@torch.no_grad()
def _ragged_forward(
    model, fast: list, rows: _Rows, site: str, base_pre: list[Tensor], base_kv: list, readout: Tensor, k: int = 1
) -> Tensor:
    """Logits ``[rows, k, vocab]`` at each row's ``k`` positions from its readout on, after its patch, computing only
    what the patch can change.

    A patch at (layer ``l``, position ``p``) leaves every position ``< p`` and every layer ``< l`` as in the base run
    (attention is causal), and positions after the readout cannot reach the metric. So each row contributes the
    tokens ``p..readout`` and enters the stack at layer ``l``; all rows' tokens are packed into one ``[tokens, d]``
    tensor (rows sorted by layer, so the tokens active at a layer are a prefix) and every layer runs one set of
    matrix products over the active tokens. Attention reads the base run's cached keys and values for the unchanged
    prefix. At the last layer only the read tokens' queries, outputs and MLPs are computed (``k`` per row: the
    readout, then the teacher-forced answer tokens a whole-answer metric scores). ``fast`` holds the blocks' modules
    (:func:`mechrecall.arch.fast_blocks`: the Llama form, with Qwen3's per-head q/k norms).
    """
    dev = base_pre[0].device
    rows = _Rows(rows.b.to(dev), rows.layer.to(dev), rows.pos.to(dev),
                 None if rows.head is None else rows.head.to(dev), rows.value)  # fmt: skip
    readout = readout.to(dev)
    n_layers, R = len(fast), len(rows.b)
    end = readout[rows.b] + k - 1  # the last position read
    n_tok = end - rows.pos + 1
    offsets = torch.cumsum(n_tok, 0) - n_tok
    N = int(n_tok.sum())
    row_of = torch.repeat_interleave(torch.arange(R, device=dev), n_tok)
    tok_pos = rows.pos[row_of] + torch.arange(N, device=dev) - offsets[row_of]
    tok_b = rows.b[row_of]
    read_tok = (offsets + n_tok - k)[:, None] + torch.arange(k, device=dev)  # [rows, k]: the read tokens
    T = int(end.max()) + 1
    dtype = base_pre[0].dtype
    cos, sin = arch.rotary_tables(model, base_pre[0][:1, :T], T)  # [T, d_head]
    mask = torch.full((T, T), torch.finfo(dtype).min, dtype=dtype, device=dev).triu(1)
    # rows (and tokens) active at each layer: those whose patch layer is <= it
    first = int(rows.layer[0])
    counts = torch.bincount(rows.layer - first, minlength=n_layers - first).cumsum(0).tolist()
    tok_counts = [int(offsets[c]) if c < R else N for c in counts]
    setter = SETTERS[site]
    h = torch.empty(N, base_pre[0].shape[-1], dtype=dtype, device=dev)
    r0 = n0 = 0
    for li in range(first, n_layers):
        blk = fast[li]
        hd = blk.attn.head_dim
        last = li == n_layers - 1
        r1, n1 = counts[li - first], tok_counts[li - first]
        join = torch.arange(
            r0, r1, device=dev
        )  # rows whose patch sits in this layer; their first token is the patched one

        def patch(act: Tensor, here: str, tok: Tensor, join: Tensor = join) -> Tensor:
            if site != here or len(join) == 0:
                return act
            return setter(act, tok, rows.value[join], None if rows.head is None else rows.head[join])

        def heads(proj, x, norm, n, hd=hd):
            y = proj(x).view(n, -1, hd)
            return norm(y) if norm is not None else y

        h[n0:n1] = base_pre[li][tok_b[n0:n1], tok_pos[n0:n1]]
        hh, rr, pos = patch(h[:n1], "resid_pre", offsets[join]), row_of[:n1], tok_pos[:n1]
        x = blk.attn_norm(hh)
        key = heads(blk.k, x, blk.k_norm, n1)
        v = blk.v(x).view(n1, -1, hd)
        c, s = cos[pos][:, None], sin[pos][:, None]
        K = base_kv[li][0][rows.b[:r1], :, :T]  # advanced indexing copies: the cache stays intact
        V = base_kv[li][1][rows.b[:r1], :, :T]
        K[rr, :, pos], V[rr, :, pos] = key * c + arch.rotate_half(key) * s, v
        if last:  # k queries per row, from its readout on; patches after attention here sit at the readout
            qt = read_tok[:r1].reshape(-1)
            qpos = (end[:r1, None] - k + 1 + torch.arange(k, device=dev)).reshape(-1)
            q = heads(blk.q, x[qt], blk.q_norm, r1 * k)
            c, s = cos[qpos][:, None], sin[qpos][:, None]
            q = q * c + arch.rotate_half(q) * s
            q = q[:, :, None] if k == 1 else q.view(r1, k, *q.shape[1:]).transpose(1, 2)  # [rows, heads, k, d_head]
            z = arch.eager_attention(blk, q, K, V, mask[qpos].view(r1, 1, k, T))
            z, hh, tok = z.reshape(r1 * k, -1), hh[qt], join * k  # row i's readout is token i * k of these tensors
        else:
            q = heads(blk.q, x, blk.q_norm, n1)
            Q = torch.zeros(r1, q.shape[1], T, hd, dtype=dtype, device=dev)
            Q[rr, :, pos] = q * c + arch.rotate_half(q) * s
            z = arch.eager_attention(blk, Q, K, V, mask[None, None])  # [rows, T, heads, d_head]
            z, tok = z[rr, pos].reshape(n1, -1), offsets[join]
        a = patch(blk.o(patch(z, "head", tok)), "attn_out", tok)
        mid = patch(hh + a, "resid_mid", tok)
        out = patch(mid + patch(blk.mlp(blk.mlp_norm(mid)), "mlp_out", tok), "resid_post", tok)
        if last:
            return arch.resid_to_logits(model, out).view(r1, k, -1)
        h[:n1] = out
        r0, n0 = r1, n1
    raise AssertionError("unreachable: the loop returns at the last layer")


@torch.no_grad()
def _hooked_forward(model, rows: _Rows, site: str, base: PatchInputs, embed_noise: Tensor | None, k: int = 1) -> Tensor:
    """Logits ``[rows, k, vocab]`` from each row's readout on: one batched whole-prompt forward of the rows' base prompts,
    a hook on each patched layer's site writing the row's value at its position (the exact path for every
    architecture). Rows are sorted by layer; each layer's hook touches only its own rows."""
    dev = model_device(model)
    ids = base.input_ids[rows.b].to(dev)
    span = base.span(k)[rows.b].to(dev)
    r_all = torch.arange(len(rows.b), device=dev)
    tgt = rows.pos.to(dev)
    handles = []
    if embed_noise is not None:
        noise = embed_noise[rows.b].to(dev)
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + noise.to(out.dtype)))
    for L in torch.unique(rows.layer).tolist():
        sel = r_all[(rows.layer == L).to(dev)]

        def write(act: Tensor, sel: Tensor = sel) -> Tensor:
            act = act.clone()
            val = rows.value[sel.to(rows.value.device)].to(act.device, act.dtype)
            if site == "head":
                view = act.view(*act.shape[:2], -1, val.shape[-1])
                view[sel, tgt[sel], rows.head.to(dev)[sel]] = val
            else:
                act[sel, tgt[sel]] = val
            return act

        handles += arch.hook_site_write(model, L, site, write)
    last: list = []
    handles.append(arch.hook_site(model, arch.n_layers(model) - 1, "resid_post", lambda t: last.append(t)))
    try:
        arch.base_model(model)(input_ids=ids, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return arch.resid_to_logits(model, read_positions(last[0], r_all, span))


def _check_inputs(base: PatchInputs, source: PatchInputs, site: str) -> None:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if len(base) != len(source) or base.positions.shape != source.positions.shape:
        raise ValueError("base and source need the same number of rows and named positions (pair them row by row)")


def _result_axes(site: str, layers: list[int], n_heads: int, base: PatchInputs) -> tuple[tuple, tuple, dict]:
    B, n_pos = len(base), base.positions.shape[1]
    if site == "head":
        shape, axes = (len(layers), n_heads, n_pos, B), ("layer", "head", "pos", "example")
        labels = {"layer": layers, "head": list(range(n_heads)), "pos": base.pos_labels, "example": list(range(B))}
    else:
        shape, axes = (len(layers), n_pos, B), ("layer", "pos", "example")
        labels = {"layer": layers, "pos": base.pos_labels, "example": list(range(B))}
    return shape, axes, labels


def activation_patch(
    model,
    base: PatchInputs,
    source: PatchInputs,
    *,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    metric: str | Metric | Sequence[str | Metric] = "logit_diff",
    corruption: GaussianNoise | None = None,
    backend: str = "hf",
    max_rows: int = 2048,
    max_tokens: int = 65536,
    skip_identical: bool = True,
    path: str = "auto",
) -> PatchResult | dict[str, PatchResult]:
    """Patch ``source``'s ``site`` activation into ``base`` at every (layer, named position) [x head], batched.

    Row ``b`` of ``source`` patches row ``b`` of ``base``: position ``base.positions[b, j]`` receives the source
    activation at ``source.positions[b, j]`` (role alignment). ``corruption`` adds noise to the base's subject
    embeddings first (ROME tracing: then ``source`` is usually the same prompts, clean).

    How it is fast (``backend="hf"``, exact): one base and one source forward cache every layer; then all patches of
    the sweep run as rows of one ragged forward (:func:`_ragged_forward`) that computes, per patch, only the tokens
    from the patched position to the readout and only the layers from the patched one on, reusing the base run's
    keys and values for the rest (Llama, Mistral, Qwen2, Qwen3). Other architectures run every patch as a row of a
    batched whole-prompt forward with one hook (:func:`_hooked_forward`; ``path="hooked"`` forces it anywhere, for
    checks). A patch whose source value equals the base value bit for bit (e.g. positions before the first token
    where clean and corrupted prompts differ), or that cannot reach the readout (after it; after attention in the
    last layer at another token), changes nothing and gets the base value without a forward (``skip_identical=False``
    runs those too). ``max_rows`` / ``max_tokens`` bound one forward's patches / tokens (memory). A list of metrics
    returns ``{name: PatchResult}`` from the same forwards. ``model`` is a plain HF causal LM for ``backend="hf"``, a
    ``TransformerBridge`` for ``"transformer_lens"``, an nnsight model for ``"nnsight"``.
    """
    _check_inputs(base, source, site)
    several = isinstance(metric, list | tuple)
    metrics = list(metric) if several else [metric]
    fns = [get_metric(m) for m in metrics]
    names = [m if isinstance(m, str) else getattr(m, "__name__", "custom") for m in metrics]
    if backend != "hf":
        if several:
            return {n: activation_patch(model, base, source, site=site, layers=layers, metric=m, backend=backend,
                                        corruption=corruption) for n, m in zip(names, metrics)}  # fmt: skip
        from mechrecall.patching.backends import activation_patch_backend

        return activation_patch_backend(
            model, base, source, site=site, layers=layers, metric=fns[0], metric_name=names[0], backend=backend,
            corruption=corruption,
        )  # fmt: skip
    if path not in ("auto", "ragged", "hooked"):
        raise ValueError(f"unknown path {path!r}; expected 'auto', 'ragged' or 'hooked'")
    d = arch.dims(model)
    n_layers, n_heads = d.n_layers, d.n_heads
    layers = list(range(n_layers)) if layers is None else [range(n_layers)[L] for L in layers]
    fast = None if path == "hooked" else arch.fast_blocks(model, base.input_ids.shape[1])
    if path == "ragged" and fast is None:
        raise ValueError(f"the ragged path implements {', '.join(arch._FAST)} blocks, not {arch.spec_of(model).name}")
    k = n_read(fns, base)
    base, source = base.widened(k), source.widened(n_read(fns, source))
    noise = corruption.noise(model, base) if corruption is not None else None
    kv: list | None = [] if fast is not None else None
    base_acts, base_pre, base_logits = capture(
        model, base.input_ids, site, embed_noise=noise, readout=base.readout if k == 1 else base.span(k), kv=kv
    )
    k_src = n_read(fns, source)
    src_read = source.readout if k_src == 1 else source.span(k_src)
    src_acts, _, src_logits = capture(model, source.input_ids, site, readout=src_read)
    base_vals = _metrics(fns, base_logits, base)
    src_vals = _metrics(fns, src_logits, source)

    sw = _sweep_table(base, source, site, layers, n_layers, n_heads, base_acts, src_acts, skip_identical)
    outs = [v[sw.b].clone() for v in base_vals]
    idx = torch.nonzero(sw.live)[:, 0]
    idx = idx[torch.argsort(sw.layer[idx] * base.input_ids.shape[1] + sw.tgt[idx], stable=True)]
    if fast is not None:  # each row costs its suffix tokens
        sizes = (base.readout[sw.b[idx]] - sw.tgt[idx] + k).tolist()
    else:  # each row is a whole prompt
        sizes = [base.input_ids.shape[1]] * len(idx)
    for start, stop in _chunks(sizes, max(1, max_rows // k), max_tokens):  # k logit rows per patch
        c = idx[start:stop]
        rows = sw.rows(c)
        if fast is not None:
            logits = _ragged_forward(model, fast, rows, site, base_pre, kv, base.readout, k)
        else:
            logits = _hooked_forward(model, rows, site, base, noise, k)
        for out, v in zip(outs, _metrics(fns, logits, base, sw.b[c])):
            out[c] = v
    shape, axes, labels = _result_axes(site, layers, n_heads, base)
    results = {
        n: PatchResult(out.view(shape), axes, labels, bv, sv, site, n)
        for n, out, bv, sv in zip(names, outs, base_vals, src_vals)
    }
    return results if several else results[names[0]]


def full_patch_logits(model, base: PatchInputs, source: PatchInputs, site: str = "resid_pre") -> Tensor:
    """Logits at the base readout after patching *every* position of every layer's ``site`` from a same-length
    source. For the residual sites this reproduces the source run's logits (a sanity check); for ``attn_out`` /
    ``mlp_out`` the rest of the base's residual stream remains."""
    if site not in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        raise ValueError(f"full patching supports resid_pre, resid_post, attn_out, mlp_out, not {site!r}")
    if base.input_ids.shape != source.input_ids.shape:
        raise ValueError("full patching needs base and source of the same shape")
    src_acts, _, _ = capture(model, source.input_ids, site)
    handles = [arch.hook_site(model, i, site, lambda t, i=i: src_acts[i]) for i in range(arch.n_layers(model))]
    dev = model_device(model)
    try:
        with torch.no_grad():
            logits = model(input_ids=base.input_ids.to(dev)).logits
    finally:
        for h in handles:
            h.remove()
    return logits[torch.arange(len(base), device=dev), base.readout.to(dev)].cpu()
