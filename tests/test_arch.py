"""mechrecall.arch against the Hugging Face modeling code of every supported architecture (tiny random models).

The checks are independent of the table they test where it matters: hooked activations are compared with the
model's own ``output_hidden_states`` / logits and with the residual sums its forward computes; unit layouts are
compared with slicing written here from the modeling code, and then confirmed functionally (zeroing one head's query
or key/value weights makes exactly that head's attention uniform / its output zero).
"""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, LlamaModel, Qwen3Config
from transformers.pytorch_utils import Conv1D

from mechrecall import arch
from tests.tiny_models import ARCHS, tiny_model

T = 8  # shorter than Gemma's 16-token sliding window, so every layer attends causally over the whole prompt
GQA = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "olmo2", "phi3"}
# OLMo-2 normalises q and k over all heads together, so zeroing one head's weights rescales the others.
HEADS_COUPLED = {"olmo2"}
Q_KINDS = {"q", "qkv_neox", "qkv_concat", "qkv_conv1d"}
KV_KINDS = {"k", "v", "qkv_neox", "qkv_concat", "qkv_conv1d"}


def _ids(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # Ids 3 .. vocab-4: clear of pad/bos/eos and of the multimodal Gemma 3's image tokens.
    return torch.randint(3, arch.dims(model).vocab - 3, (1, T), generator=g)


def _block_params(model, layer: int):
    """(full HF name, parameter) of block ``layer``'s parameters."""
    prefix = f"{arch.spec_of(model).blocks}.{layer}."
    return [(n, p) for n, p in model.named_parameters() if n.startswith(prefix)]


def _kind(name: str, model) -> str | None:
    """Layout kind of a weight, or of the weight a bias belongs to."""
    if name.endswith(".bias"):
        return arch.matrix_kind(name[: -len("bias")] + "weight", model)
    return arch.matrix_kind(name, model)


# ------------------------------------------------------------------------------------------------ table and dims
@pytest.mark.parametrize("name", ARCHS)
def test_spec_and_dims(name):
    model = tiny_model(name)
    spec = arch.spec_of(model)
    assert model.config.model_type in spec.model_types and spec.name == name
    assert arch.spec_of(model.config) == spec
    d = arch.dims(model)
    assert d == arch.dims(model.config)
    kv = 2 if name in GQA else 4
    assert d == arch.Dims(n_layers=2, d_model=64, n_heads=4, n_kv_heads=kv, head_dim=16, d_mlp=128, vocab=512)
    assert arch.n_layers(model) == 2
    assert arch.parallel_residual(model) == (name == "gpt_neox")


def test_dims_read_family_attribute_names():
    gpt2 = arch.dims(GPT2Config(n_embd=64, n_head=4, n_layer=3, vocab_size=100))  # n_inner None -> 4 * n_embd
    assert gpt2 == arch.Dims(n_layers=3, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, d_mlp=256, vocab=100)
    # Qwen 3's head_dim is its own setting (default 128), not hidden_size // heads.
    assert arch.dims(Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)).head_dim == 128
    assert arch.dims(LlamaConfig(hidden_size=64, num_attention_heads=4)).head_dim == 16


def test_spec_table_is_read_only_and_hashable():
    spec = arch.ARCH_SPECS["llama"]
    with pytest.raises(TypeError):
        spec.matrices["x"] = "q"
    assert hash(spec) == hash(arch.spec_of(LlamaConfig()))
    assert set(arch.SUPPORTED) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_neox", "gpt2"}
    assert set(arch.SUPPORTED) >= {"olmo2", "phi3"}


# ------------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("name", ARCHS)
def test_modules(name):
    model = tiny_model(name)
    layers = arch.blocks(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    assert arch.get_module(model, f"{arch.spec_of(model).blocks}.1") is layers[1]
    assert arch.base_model(model).get_submodule(arch.spec_of(model).blocks.rpartition(".")[2]) is layers
    assert isinstance(arch.embedding(model), nn.Embedding) and arch.embedding(model) is model.get_input_embeddings()
    assert isinstance(arch.unembed(model), nn.Linear) and arch.unembed(model) is model.get_output_embeddings()
    assert "Norm" in type(arch.final_norm(model)).__name__
    assert arch.embed_scale(model) == (8.0 if name.startswith("gemma") else 1.0)  # sqrt(64)
    proj = arch.block_part(model, 0, "attn_out_proj")
    assert isinstance(proj, Conv1D if name == "gpt2" else nn.Linear)
    assert "Attention" in type(arch.block_part(model, 0, "attn")).__name__
    assert "MLP" in type(arch.block_part(model, 0, "mlp")).__name__
    with pytest.raises(ValueError, match="unknown block part"):
        arch.block_part(model, 0, "ffn")
    with pytest.raises(AttributeError, match="no submodule"):
        arch.get_module(model, "nonexistent.path")


# ------------------------------------------------------------------------------------------------ sites
def _capture(model, sites, layers):
    """Register raw hooks on ``site_hook_point`` for every (site, layer); returns (store, handles)."""
    store, handles = {}, []
    for site in sites:
        for L in layers:
            module, where = arch.site_hook_point(model, L, site)
            if where == "input":

                def pre(m, args, kwargs, key=(site, L)):
                    store[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(m, args, out, key=(site, L)):
                    store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()

                handles.append(module.register_forward_hook(post))
    for sub in ("attn", "mlp"):
        for L in layers:
            module = arch.residual_contribution(model, L, sub)

            def post(m, args, out, key=(f"{sub}_added", L)):
                store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()

            handles.append(module.register_forward_hook(post))
    return store, handles


@pytest.mark.parametrize("name", ARCHS)
def test_site_hooks_match_hidden_states_and_residual_sums(name):
    model = tiny_model(name)
    d, ids = arch.dims(model), _ids(model)
    parallel = arch.parallel_residual(model)
    sites = [s for s in arch.SITES if not (parallel and s == "resid_mid")]
    store, handles = _capture(model, sites, range(d.n_layers))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == d.n_layers + 1
    for L in range(d.n_layers):
        torch.testing.assert_close(store["resid_pre", L], hs[L], rtol=0, atol=0)
        if L + 1 < d.n_layers:
            torch.testing.assert_close(store["resid_post", L], store["resid_pre", L + 1], rtol=0, atol=0)
        for site in sites:
            width = d.n_heads * d.head_dim if site == "head" else d.d_model
            assert store[site, L].shape == (1, T, width), (site, L)
        pre, post = store["resid_pre", L], store["resid_post", L]
        attn_added, mlp_added = store["attn_added", L], store["mlp_added", L]
        if parallel:
            torch.testing.assert_close(post, pre + store["attn_out", L] + store["mlp_out", L], rtol=0, atol=1e-5)
        else:
            # resid_mid is what the block adds attention's (post-normed, for Gemma / OLMo-2) output to.
            torch.testing.assert_close(store["resid_mid", L], pre + attn_added, rtol=0, atol=1e-5)
            torch.testing.assert_close(post, store["resid_mid", L] + mlp_added, rtol=0, atol=1e-5)
        if arch.spec_of(model).attn_post_norm is None:
            torch.testing.assert_close(attn_added, store["attn_out", L], rtol=0, atol=0)
    if name in {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3"}:  # no post-norms: the plain sum
        for L in range(d.n_layers):
            torch.testing.assert_close(
                store["resid_mid", L], store["resid_pre", L] + store["attn_out", L], rtol=0, atol=1e-5
            )
    # The last block's output is pre-final-norm; resid_to_logits finishes the forward (Gemma 2: soft-capped).
    with torch.no_grad():
        logits = arch.resid_to_logits(model, store["resid_post", d.n_layers - 1])
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
    # The residual stream starts at the embedding's output (Gemma: scaled inside it; GPT-2: plus positions).
    emb = arch.embedding(model)
    start = emb.weight[ids] * arch.embed_scale(model)
    if name == "gpt2":
        start = start + arch.get_module(model, arch.spec_of(model).pos_embed).weight[:T]
    torch.testing.assert_close(hs[0], start, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ARCHS)
def test_hook_site_replaces_and_restores(name):
    model = tiny_model(name)
    ids = _ids(model)
    with torch.no_grad():
        base = model(ids).logits
    for site in ("resid_pre", "attn_out", "head", "resid_post"):
        seen = []
        handle = arch.hook_site(model, 0, site, lambda x, seen=seen: seen.append(x.shape) or x.clone())
        try:
            with torch.no_grad():
                same = model(ids).logits
        finally:
            handle.remove()
        assert seen and torch.equal(same, base), site
    handle = arch.hook_site(model, 0, "head", torch.zeros_like)
    try:
        with torch.no_grad():
            ablated = model(ids).logits
    finally:
        handle.remove()
    assert not torch.allclose(ablated, base)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # the handle really went away


def test_parallel_gpt_neox_has_no_resid_mid_but_sequential_does():
    model = tiny_model("gpt_neox")
    assert arch.resid_mid_module(model) is None
    with pytest.raises(ValueError, match=r"gpt_neox.*resid_mid.*parallel"):
        arch.site_hook_point(model, 0, "resid_mid")
    config = copy.deepcopy(model.config)
    config.use_parallel_residual = False
    torch.manual_seed(0)
    seq = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert not arch.parallel_residual(seq) and arch.resid_mid_module(seq) == "post_attention_layernorm"
    store, handles = _capture(seq, ["resid_pre", "resid_mid", "attn_out"], [0])
    try:
        with torch.no_grad():
            seq(_ids(seq))
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(store["resid_mid", 0], store["resid_pre", 0] + store["attn_out", 0], rtol=0, atol=1e-5)


def test_site_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown site"):
        arch.site_hook_point(model, 0, "resid")


# ------------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", ARCHS)
def test_block_matrices_cover_attention_and_mlp_weights(name):
    model = tiny_model(name)
    spec = arch.spec_of(model)
    inside = set()
    for L, block in enumerate(arch.blocks(model)):
        for path in (spec.attn, spec.mlp):
            for n, p in arch.get_module(block, path).named_parameters():
                full = f"{spec.blocks}.{L}.{path}.{n}"
                inside.add(full)
                assert arch.layer_of(full, model) == L
                if p.ndim == 2:
                    assert arch.is_block_matrix(full, model), full
                    assert arch.param_shape(full, model) == tuple(p.shape), full
                else:  # biases and Qwen 3 / Gemma 3 / OLMo-2 q_norm, k_norm
                    assert not arch.is_block_matrix(full, model), full
                    if _kind(full, model) is not None:
                        assert arch.param_shape(full, model) == tuple(p.shape), full
    for n, _ in model.named_parameters():
        if n not in inside:  # norms, embeddings, unembedding, Gemma 3's vision tower
            assert not arch.is_block_matrix(n, model), n
            assert arch.matrix_kind(n, model) is None
    assert arch.layer_of(f"{spec.embed}.weight", model) is None
    assert arch.layer_of(f"{spec.unembed}.weight", model) is None
    assert arch.layer_of(f"{spec.final_norm}.weight", model) is None
    assert sum(arch.is_block_matrix(n, model) for n, _ in model.named_parameters()) == 2 * len(spec.matrices)


def _hand_mask(kind: str, d: arch.Dims, unit: str, i: int, shape) -> torch.Tensor:
    """Unit ``i``'s entries, sliced by hand the way the modeling code reads the weight."""
    H, KV, hd, F = d.n_heads, d.n_kv_heads, d.head_dim, d.d_mlp
    m = torch.zeros(shape, dtype=torch.bool)
    own = slice(i * hd, (i + 1) * hd)  # head i's block in an unfused projection
    k_part = slice(H * hd + i * hd, H * hd + (i + 1) * hd)  # key head i in a [q | k | v] concatenation
    v_part = slice((H + KV) * hd + i * hd, (H + KV) * hd + (i + 1) * hd)
    if kind in ("q", "k", "v", "o_conv1d"):  # o_conv1d: Conv1D c_proj's rows are its inputs
        m[own] = True
    elif kind == "o":
        m[:, own] = True
    elif kind == "qkv_concat":  # Phi-3: q, k, v = qkv[..., :H*hd], next KV*hd, rest
        if unit == "q_heads":
            m[own] = True
        else:
            m[k_part] = m[v_part] = True
    elif kind == "qkv_conv1d":  # GPT-2: q, k, v = c_attn(x).split(E, dim=2), columns of the [in, out] weight
        if unit == "q_heads":
            m[:, own] = True
        else:
            m[:, k_part] = m[:, v_part] = True
    elif kind == "qkv_neox":  # GPT-NeoX: qkv.view(..., n_heads, 3 * hd) then chunk(3, -1)
        per_head = m.view(H, 3, hd, -1)
        if unit == "q_heads":
            per_head[i, 0] = True
        else:
            per_head[i, 1:] = True
    elif kind in ("mlp_in", "mlp_out_conv1d"):
        m[i] = True
    elif kind in ("mlp_out", "mlp_in_conv1d"):
        m[:, i] = True
    elif kind == "mlp_in_fused":  # Phi-3: gate, up = gate_up_proj(x).chunk(2, -1)
        m[i] = m[F + i] = True
    else:
        raise AssertionError(kind)
    return m


@pytest.mark.parametrize("name", ARCHS)
def test_unit_counts_match_hand_slicing(name):
    model = tiny_model(name)
    d = arch.dims(model)
    g = torch.Generator().manual_seed(2)
    n_units = {"q_heads": d.n_heads, "kv_heads": d.n_kv_heads, "neurons": d.d_mlp}
    for n, p in _block_params(model, 1):
        kind = _kind(n, model)
        if kind is None:
            with pytest.raises(ValueError, match="not a block"):
                arch.unit_counts(n, torch.ones_like(p), model)
            continue
        ones = arch.unit_counts(n, torch.ones(p.shape, dtype=torch.bool), model)
        sizes = arch.unit_sizes(n, p.shape, model)
        assert set(ones) == set(sizes)
        if p.ndim == 2 or ones:  # weights always have units; o / mlp_out biases have none
            assert ones and sum(float(c.sum()) for c in ones.values()) == p.numel(), n
        if kind in ("qkv_neox", "qkv_concat", "qkv_conv1d") and p.ndim == 2:
            assert set(ones) == {"q_heads", "kv_heads"}
        for unit, counts in ones.items():
            assert counts.shape == (n_units[unit],) and counts.dtype == torch.float64
            assert torch.all(counts == sizes[unit]), (n, unit)
        mask = torch.rand(p.shape, generator=g) < 0.3
        counts = arch.unit_counts(n, mask, model)
        scores = torch.rand(p.shape, generator=g)
        weighted = arch.unit_counts(n, scores, model)
        for unit in counts:
            for i in range(n_units[unit]):
                sel = arch.unit_index(n, model, unit, i)
                assert sel.shape == p.shape and sel.dtype == torch.bool
                if p.ndim == 2:
                    assert torch.equal(sel, _hand_mask(kind, d, unit, i, p.shape)), (n, unit, i)
                assert counts[unit][i] == mask[sel].sum(), (n, unit, i)
                torch.testing.assert_close(weighted[unit][i], scores[sel].sum())
        with pytest.raises(ValueError, match="should have shape"):
            arch.unit_counts(n, torch.ones(3, 5), model)


def test_unit_index_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no 'neurons' units"):
        arch.unit_index("model.layers.0.self_attn.q_proj.weight", model, "neurons", 0)
    with pytest.raises(IndexError):
        arch.unit_index("model.layers.0.self_attn.k_proj.weight", model, "kv_heads", 2)
    assert arch.unit_counts("model.layers.0.self_attn.o_proj.weight", torch.ones(64, 64), model.config)["q_heads"][
        0
    ] == pytest.approx(64 * 16)


def _zero_units(model, layer: int, kinds: set[str], unit: str, index: int) -> None:
    with torch.no_grad():
        for n, p in _block_params(model, layer):
            if _kind(n, model) in kinds and unit in arch.unit_sizes(n, p.shape, model):
                p[arch.unit_index(n, model, unit, index)] = 0.0


def _run(model, ids, layer):
    """(attention pattern [heads, T, T] of ``layer``, per-head outputs [T, heads, hd] entering its out-projection)."""
    z = []
    handle = arch.hook_site(model, layer, "head", lambda x: z.append(x.detach().clone()))
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True)
    finally:
        handle.remove()
    d = arch.dims(model)
    return out.attentions[layer][0], z[0][0].view(T, d.n_heads, d.head_dim)


@pytest.mark.parametrize("name", ARCHS)
def test_unit_index_selects_the_heads_the_model_uses(name):
    """Zero one query head's rows (with biases): only its pattern goes uniform. Zero one key/value head: the query
    heads it serves attend uniformly and output exactly zero, the others are untouched."""
    model = tiny_model(name, attn="eager")  # (the attention patterns are read: only eager attention returns them)
    d, ids, L = arch.dims(model), _ids(model), 1
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    pattern, z = _run(model, ids, L)
    assert not torch.allclose(pattern[1], uniform, atol=1e-3)

    q_ablated = copy.deepcopy(model)
    _zero_units(q_ablated, L, Q_KINDS, "q_heads", 1)
    pattern_q, _ = _run(q_ablated, ids, L)
    torch.testing.assert_close(pattern_q[1], uniform, rtol=0, atol=1e-6)
    if name not in HEADS_COUPLED:
        others = [h for h in range(d.n_heads) if h != 1]
        torch.testing.assert_close(pattern_q[others], pattern[others], rtol=0, atol=1e-6)

    kv_ablated = copy.deepcopy(model)
    _zero_units(kv_ablated, L, KV_KINDS, "kv_heads", 1)
    pattern_kv, z_kv = _run(kv_ablated, ids, L)
    group = d.n_heads // d.n_kv_heads
    served = list(range(group, 2 * group))
    torch.testing.assert_close(pattern_kv[served], uniform.expand(group, T, T), rtol=0, atol=1e-6)
    assert torch.all(z_kv[:, served] == 0)
    if name not in HEADS_COUPLED:
        rest = [h for h in range(d.n_heads) if h not in served]
        torch.testing.assert_close(z_kv[:, rest], z[:, rest], rtol=0, atol=1e-6)


def _site_output(model, ids, layer: int, site: str, patch=None) -> torch.Tensor:
    """``site``'s tensor at ``layer`` in a forward where ``patch`` (if given) replaces the ``head`` activation."""
    seen = []
    handles = [arch.hook_site(model, layer, site, lambda x: seen.append(x.detach().clone()))]
    if patch is not None:
        handles.append(arch.hook_site(model, layer, "head", patch))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen[0]


@pytest.mark.parametrize("name", ARCHS)
def test_unit_index_selects_the_output_columns_and_neurons_the_model_uses(name):
    """Zeroing query head h's out-projection entries equals zeroing head h's activation; zeroing neuron i's input
    weights (and biases) equals zeroing its output weights (every supported activation maps 0 to 0)."""
    model = tiny_model(name)
    d, ids, L, h, i = arch.dims(model), _ids(model), 1, 2, 5
    base_attn = _site_output(model, ids, L, "attn_out")

    def drop_head(x):
        x = x.clone()
        x[..., h * d.head_dim : (h + 1) * d.head_dim] = 0
        return x

    by_activation = _site_output(model, ids, L, "attn_out", patch=drop_head)
    o_ablated = copy.deepcopy(model)
    _zero_units(o_ablated, L, {"o", "o_conv1d"}, "q_heads", h)
    torch.testing.assert_close(_site_output(o_ablated, ids, L, "attn_out"), by_activation, rtol=0, atol=1e-6)
    assert not torch.allclose(by_activation, base_attn, atol=1e-4)

    base_mlp = _site_output(model, ids, L, "mlp_out")
    outs = []
    for kinds in ({"mlp_in", "mlp_in_fused", "mlp_in_conv1d"}, {"mlp_out", "mlp_out_conv1d"}):
        ablated = copy.deepcopy(model)
        _zero_units(ablated, L, kinds, "neurons", i)
        outs.append(_site_output(ablated, ids, L, "mlp_out"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    assert not torch.allclose(outs[0], base_mlp, atol=1e-5)


def test_resid_to_logits_soft_caps_gemma2():
    model = copy.deepcopy(tiny_model("gemma2"))
    model.config.final_logit_softcapping = 0.05  # small enough that capping visibly changes the tiny logits
    ids = _ids(model)
    resid = _site_output(model, ids, 1, "resid_post")
    with torch.no_grad():
        logits = model(ids).logits
        uncapped = arch.unembed(model)(arch.final_norm(model)(resid))
    assert logits.abs().max() <= 0.05 and not torch.allclose(uncapped, logits, atol=1e-3)
    torch.testing.assert_close(arch.resid_to_logits(model, resid), logits, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ unsupported
def test_unsupported_architectures_name_themselves_and_the_table():
    opt = AutoConfig.for_model(
        "opt", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32
    )
    opt.update({"word_embed_proj_dim": 16})
    model = AutoModelForCausalLM.from_config(opt)
    with pytest.raises(arch.UnsupportedArchitecture) as err:
        arch.blocks(model)
    message = str(err.value)
    assert "'opt'" in message and "OPTForCausalLM" in message
    assert all(t in message for t in arch.SUPPORTED)
    assert isinstance(err.value, ValueError)
    with pytest.raises(arch.UnsupportedArchitecture, match="'bert'.*supported: llama"):
        arch.dims(BertConfig())
    base = LlamaModel(LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=32))
    with pytest.raises(arch.UnsupportedArchitecture, match="LlamaModel.*model.layers"):
        arch.spec_of(base)
    with pytest.raises(arch.UnsupportedArchitecture, match="no Hugging Face config"):
        arch.spec_of(nn.Linear(2, 2))
