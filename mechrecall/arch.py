"""The one place that knows the internals of the Hugging Face causal LMs mechrecall supports.

Everything else in the package (caches, patching, masks, attribution) asks this module *where* things are and *how*
a weight is laid out, instead of spelling ``model.model.layers[L].self_attn.o_proj`` itself. The design follows
pyvene's per-architecture mapping table and TransformerLens's architecture adapters: one :class:`ArchSpec` row per
``config.model_type`` (module paths + weight layouts), and small functions that read that row.

Vocabulary used throughout:

* **paths** are dotted attribute paths from the ``*ForCausalLM`` object (``"model.layers"``) or, for the per-block
  fields, from one block (``"self_attn.o_proj"``); integer parts index module lists (``"model.layers.3"``);
* **sites** are the activations a hook can read or replace: ``resid_pre`` / ``resid_mid`` / ``resid_post`` (the
  residual stream before the block, between attention and MLP, after the block), ``attn_out`` / ``mlp_out`` (what the
  attention / MLP module returns) and ``head`` (the per-head attention outputs, packed ``[batch, pos, n_heads*head_dim]``,
  entering the attention output projection);
* **kinds** describe how a block weight's entries map onto **units**: query heads (``q_heads``), key/value heads
  (``kv_heads``, fewer than query heads under grouped-query attention) and MLP neurons (``neurons``).

Layout kinds (``W`` as stored in the parameter; ``nn.Linear`` stores ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``):

==================  =====================================================================================
``q``               rows ``h*hd:(h+1)*hd`` belong to query head ``h``
``k``, ``v``        rows ``j*hd:(j+1)*hd`` belong to key/value head ``j``
``o``               columns ``h*hd:(h+1)*hd`` belong to query head ``h`` (they read head ``h``'s output)
``mlp_in``          row ``i`` belongs to neuron ``i`` (gate / up / fc-in)
``mlp_out``         column ``i`` belongs to neuron ``i``
``qkv_neox``        GPT-NeoX ``query_key_value``: rows viewed as ``[n_heads, 3, hd]`` -- head ``h`` owns its query,
                    key and value rows *interleaved* ``[q_h | k_h | v_h]`` at rows ``3*h*hd:3*(h+1)*hd``
``qkv_concat``      Phi-3 ``qkv_proj``: rows ``[q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)]``
``qkv_conv1d``      GPT-2 ``c_attn``: *columns* ``[q | k | v]``, each ``n_heads*hd`` wide
``mlp_in_fused``    Phi-3 ``gate_up_proj``: rows ``[gate (d_mlp) | up (d_mlp)]``; row ``i`` and ``d_mlp+i`` -> neuron ``i``
``o_conv1d``        GPT-2 ``attn.c_proj``: *rows* ``h*hd:(h+1)*hd`` -> query head ``h``
``mlp_in_conv1d``   GPT-2 ``mlp.c_fc``: column ``i`` -> neuron ``i``
``mlp_out_conv1d``  GPT-2 ``mlp.c_proj``: row ``i`` -> neuron ``i``
==================  =====================================================================================

A fused ``qkv_*`` weight therefore yields both ``q_heads`` and ``kv_heads``. Biases of listed weights (Qwen2's q/k/v,
GPT-NeoX's and GPT-2's everywhere) are understood by :func:`unit_counts` / :func:`unit_index` / :func:`unit_sizes`
(a bias follows its weight's *output* axis, so an ``o`` or ``mlp_out`` bias belongs to no unit), but only weights
count as block matrices for the default mask selection (:func:`is_block_matrix`).

Caveats worth knowing when reading activations of these models:

* Gemma's token embedding module multiplies by ``sqrt(d_model)`` in its forward: hook its *output* (or use
  :func:`embed_scale`) rather than reading ``.weight`` as the residual stream's start;
* Gemma 2/3 and OLMo-2 normalise each sublayer's output *before* adding it to the residual stream
  (``post_attention_layernorm``, ``post_feedforward_layernorm``), so ``resid_mid - resid_pre`` is the post-norm of
  ``attn_out``, not ``attn_out`` itself; :func:`residual_contribution` names the module whose output is added;
* Gemma 2 soft-caps the final logits (``tanh``): use :func:`resid_to_logits` rather than ``lm_head(norm(x))``;
* OLMo-2's ``q_norm`` / ``k_norm`` normalise over *all* heads at once, so a query head's output depends on the
  other heads' query weights (Qwen 3 and Gemma 3 normalise per head and keep heads independent);
* GPT-NeoX (Pythia) runs attention and MLP in parallel off the same ``resid_pre`` when
  ``use_parallel_residual`` (Pythia's default): there is no ``resid_mid``. It also rotates only the first
  ``partial_rotary_factor`` (``rotary_pct``) of each head's dimensions, and transformers 5 names its unembedding
  ``lm_head`` (checkpoints' ``embed_out`` is renamed on load);
* GPT-2 adds learned position embeddings (``transformer.wpe``) to the token embeddings and uses ``Conv1D`` weights
  stored transposed (``[in, out]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

import torch
from jaxtyping import Bool
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedConfig

__all__ = [
    "SITES",
    "BLOCK_PARTS",
    "UNITS",
    "UnsupportedArchitecture",
    "ArchSpec",
    "Dims",
    "ARCH_SPECS",
    "SUPPORTED",
    "spec_of",
    "dims",
    "n_layers",
    "parallel_residual",
    "resid_mid_module",
    "get_module",
    "blocks",
    "base_model",
    "embedding",
    "embed_scale",
    "final_norm",
    "unembed",
    "resid_to_logits",
    "normed_to_logits",
    "softcap_logits",
    "block_part",
    "residual_contribution",
    "site_hook_point",
    "hook_site",
    "hook_site_write",
    "layer_of",
    "matrix_kind",
    "is_block_matrix",
    "param_shape",
    "unit_counts",
    "unit_index",
    "unit_sizes",
    "FastBlock",
    "fast_blocks",
    "rotary_tables",
    "rotate_half",
    "eager_attention",
    "site_path",
    "PARAM_PARTS",
    "ParamPlace",
    "place_of",
    "has_layout",
    "attention_implementation",
]

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head")
BLOCK_PARTS = ("attn", "attn_out_proj", "mlp", "resid_mid", "attn_post_norm", "mlp_post_norm")
UNITS = ("q_heads", "kv_heads", "neurons")


class UnsupportedArchitecture(ValueError):
    """A model or config whose ``model_type`` has no row in the architecture table (or whose modules do not match it)."""


@dataclass(frozen=True)
class ArchSpec:
    """One row of the architecture table: where an architecture keeps its modules and how its block weights are laid out.

    Model-level paths (``blocks``, ``embed``, ``final_norm``, ``unembed``, ``pos_embed``) start at the
    ``*ForCausalLM``; block-level paths (``attn``, ``attn_out_proj``, ``mlp``, ``resid_mid_module``, the post-norms
    and the ``matrices`` keys) start at one block. ``resid_mid_module`` is the module whose *input* is the residual
    stream between attention and MLP; for architectures that may run them in parallel, :func:`resid_mid_module`
    decides per config. ``attn_post_norm`` / ``mlp_post_norm`` are the norms applied to a sublayer's output before it
    joins the residual stream (Gemma 2/3, OLMo-2), ``None`` elsewhere. The ``*_key`` fields name config attributes the
    modeling code reads: ``head_dim_key`` (``None``: always ``d_model // n_heads``), ``parallel_residual_key`` and
    ``logit_softcap_key`` (final-logit ``tanh`` soft-capping).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    attn_out_proj: str
    mlp: str
    resid_mid_module: str | None
    # Excluded from the hash so specs stay hashable (usable as cache keys); stored read-only.
    matrices: Mapping[str, str] = field(hash=False)
    pos_embed: str | None = None
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    head_dim_key: str | None = "head_dim"
    parallel_residual_key: str | None = None
    logit_softcap_key: str | None = None

    def __post_init__(self):
        bad = {k: v for k, v in self.matrices.items() if v not in _KINDS}
        if bad:
            raise ValueError(f"{self.name}: unknown layout kinds {bad}; known: {', '.join(_KINDS)}")
        object.__setattr__(self, "matrices", MappingProxyType(dict(self.matrices)))

    @property
    def base(self) -> str:
        """Path of the decoder stack (``model`` / ``gpt_neox`` / ``transformer``): the parent of ``blocks``."""
        return self.blocks.rpartition(".")[0]


@dataclass(frozen=True)
class Dims:
    """Sizes of a decoder, read from its config whatever the family calls them."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab: int


_KINDS = (
    "q",
    "k",
    "v",
    "o",
    "mlp_in",
    "mlp_out",
    "qkv_neox",
    "qkv_concat",
    "qkv_conv1d",
    "mlp_in_fused",
    "o_conv1d",
    "mlp_in_conv1d",
    "mlp_out_conv1d",
)

_LLAMA_MATRICES = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "mlp.gate_proj.weight": "mlp_in",
    "mlp.up_proj.weight": "mlp_in",
    "mlp.down_proj.weight": "mlp_out",
}


def _llama_like(name: str, **overrides) -> ArchSpec:
    """A row for the Llama module tree (``model.layers[L].self_attn.q_proj`` ...), with per-family overrides."""
    fields = dict(
        name=name,
        model_types=(name,),
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        attn_out_proj="self_attn.o_proj",
        mlp="mlp",
        resid_mid_module="post_attention_layernorm",
        matrices=_LLAMA_MATRICES,
    )
    return ArchSpec(**(fields | overrides))


_GEMMA = dict(
    resid_mid_module="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
)

_TABLE = (
    _llama_like("llama"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),
    _llama_like("gemma2", logit_softcap_key="final_logit_softcapping", **_GEMMA),
    _llama_like("gemma3_text", logit_softcap_key="final_logit_softcapping", **_GEMMA),
    # The multimodal Gemma 3 checkpoints load as Gemma3ForConditionalGeneration: the text decoder sits one level
    # deeper, and that class does not soft-cap logits.
    _llama_like(
        "gemma3",
        blocks="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        **_GEMMA,
    ),
    # OLMo-2 has no pre-norms: the MLP reads the residual stream directly.
    _llama_like(
        "olmo2",
        resid_mid_module="mlp",
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    ),
    _llama_like(
        "phi3",
        matrices={
            "self_attn.qkv_proj.weight": "qkv_concat",
            "self_attn.o_proj.weight": "o",
            "mlp.gate_up_proj.weight": "mlp_in_fused",
            "mlp.down_proj.weight": "mlp_out",
        },
    ),
    ArchSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        attn_out_proj="attention.dense",
        mlp="mlp",
        resid_mid_module="post_attention_layernorm",  # only when not use_parallel_residual
        matrices={
            "attention.query_key_value.weight": "qkv_neox",
            "attention.dense.weight": "o",
            "mlp.dense_h_to_4h.weight": "mlp_in",
            "mlp.dense_4h_to_h.weight": "mlp_out",
        },
        head_dim_key=None,
        parallel_residual_key="use_parallel_residual",
    ),
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        attn_out_proj="attn.c_proj",
        mlp="mlp",
        resid_mid_module="ln_2",
        matrices={
            "attn.c_attn.weight": "qkv_conv1d",
            "attn.c_proj.weight": "o_conv1d",
            "mlp.c_fc.weight": "mlp_in_conv1d",
            "mlp.c_proj.weight": "mlp_out_conv1d",
        },
        pos_embed="transformer.wpe",
        head_dim_key=None,
    ),
)

ARCH_SPECS: Mapping[str, ArchSpec] = MappingProxyType({t: spec for spec in _TABLE for t in spec.model_types})
SUPPORTED: tuple[str, ...] = tuple(ARCH_SPECS)


# ------------------------------------------------------------------------------------------------ lookup
def _config(model_or_config: nn.Module | PreTrainedConfig) -> PreTrainedConfig:
    if isinstance(model_or_config, PreTrainedConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if not isinstance(config, PreTrainedConfig):
        raise UnsupportedArchitecture(
            f"{type(model_or_config).__name__} has no Hugging Face config; pass a *ForCausalLM or its config"
        )
    return config


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    # Multimodal configs (gemma3) keep the decoder's sizes in a sub-config; text configs return themselves.
    return config.get_text_config()


def spec_of(model_or_config: nn.Module | PreTrainedConfig) -> ArchSpec:
    """The table row for a ``*ForCausalLM`` or its config, by ``config.model_type``.

    Given a model, also checks that its block list is where the row says, so a base model (``LlamaModel``) or an
    unexpected class for a known ``model_type`` fails here with a clear message instead of deep inside a hook.
    Raises :class:`UnsupportedArchitecture` naming the type and class and listing :data:`SUPPORTED`.
    """
    config = _config(model_or_config)
    model_type = getattr(config, "model_type", None) or "?"
    spec = ARCH_SPECS.get(model_type)
    if isinstance(model_or_config, nn.Module):
        cls = type(model_or_config).__name__
    else:
        cls = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if spec is None:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} ({cls}) is not supported; supported: {', '.join(SUPPORTED)}"
        )
    if isinstance(model_or_config, nn.Module):
        try:
            get_module(model_or_config, spec.blocks)
        except AttributeError as e:
            raise UnsupportedArchitecture(
                f"{cls} (model_type {model_type!r}) has no {spec.blocks!r}; mechrecall.arch expects the causal LM "
                f"class the table is written for (e.g. AutoModelForCausalLM), not a base model"
            ) from e
    return spec


def dims(model_or_config: nn.Module | PreTrainedConfig) -> Dims:
    """Layer count, widths and head counts, read as the modeling code reads them.

    GPT-2 names them ``n_layer`` / ``n_embd`` / ``n_head`` (its config maps the standard names onto those) and leaves
    ``n_inner`` ``None`` for ``4 * n_embd``; models without grouped-query attention have ``n_kv_heads == n_heads``;
    ``head_dim`` comes from the config's ``head_dim`` where the family's modeling code reads one (Qwen 3 and Gemma
    default it independently of ``hidden_size``), else ``d_model // n_heads``.
    """
    spec = spec_of(model_or_config)
    config = _text_config(_config(model_or_config))
    d_model, n_heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = getattr(config, spec.head_dim_key, None) if spec.head_dim_key else None
    d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model
    return Dims(
        n_layers=int(config.num_hidden_layers),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=int(head_dim or d_model // n_heads),
        d_mlp=int(d_mlp),
        vocab=int(config.vocab_size),
    )


def n_layers(model_or_config: nn.Module | PreTrainedConfig) -> int:
    """Number of decoder blocks."""
    return dims(model_or_config).n_layers


def parallel_residual(model_or_config: nn.Module | PreTrainedConfig) -> bool:
    """Whether attention and MLP both read ``resid_pre`` and add to it together (GPT-NeoX ``use_parallel_residual``)."""
    key = spec_of(model_or_config).parallel_residual_key
    return bool(key and getattr(_config(model_or_config), key, False))


def resid_mid_module(model_or_config: nn.Module | PreTrainedConfig) -> str | None:
    """Block-relative path of the module whose input is ``resid_mid``; ``None`` for parallel-residual configs."""
    return None if parallel_residual(model_or_config) else spec_of(model_or_config).resid_mid_module


# ------------------------------------------------------------------------------------------------ modules
def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """``root.a.b.3.c`` for ``dotted="a.b.3.c"`` (integer parts index module lists); ``""`` is ``root`` itself.

    Raises ``AttributeError`` naming the part that is missing and the class it was looked up on.
    """
    module = root
    for part in dotted.split(".") if dotted else ():
        if part.isdigit() and isinstance(module, nn.ModuleList | nn.Sequential):
            module = module[int(part)]
        elif isinstance(getattr(module, part, None), nn.Module):
            module = getattr(module, part)
        else:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (resolving {dotted!r})")
    return module


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order."""
    return get_module(model, spec_of(model).blocks)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the unembedding (``model.model`` / ``model.gpt_neox`` / ``model.transformer``).

    Calling it returns the final-normed hidden states, which is how a cache avoids computing vocabulary logits.
    """
    return get_module(model, spec_of(model).base)


def embedding(model: nn.Module) -> nn.Module:
    """The token embedding. Its *output* starts the residual stream, except that GPT-2 adds position embeddings.

    Gemma's embedding multiplies by ``sqrt(d_model)`` inside its forward (see :func:`embed_scale`).
    """
    return get_module(model, spec_of(model).embed)


def embed_scale(model: nn.Module) -> float:
    """The factor the token embedding's forward multiplies its ``.weight`` rows by (Gemma ``sqrt(d_model)``, else 1)."""
    return float(getattr(embedding(model), "scalar_embed_scale", 1.0))


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the unembedding."""
    return get_module(model, spec_of(model).final_norm)


def unembed(model: nn.Module) -> nn.Module:
    """The unembedding (``lm_head``); it may share its weight with the embedding (Gemma, GPT-2, small Llamas/Qwens)."""
    return get_module(model, spec_of(model).unembed)


def resid_to_logits(model: nn.Module, resid: Tensor) -> Tensor:
    """Logits from residual-stream states ``[..., d_model]`` exactly as the model's forward makes them.

    Final norm, unembedding, then Gemma 2's final-logit soft-capping ``cap * tanh(logits / cap)`` where configured;
    applying it to the last block's ``resid_post`` reproduces ``model(...).logits`` (the logit lens for earlier ones).
    """
    return normed_to_logits(model, final_norm(model)(resid))


def normed_to_logits(model: nn.Module, normed: Tensor) -> Tensor:
    """Logits from final-normed hidden states (what :func:`base_model` returns): unembedding + soft-capping."""
    return softcap_logits(model, unembed(model)(normed))


def softcap_logits(model: nn.Module, logits: Tensor) -> Tensor:
    """The unembedding's output as the model's forward returns it: Gemma 2's final-logit soft-capping
    ``cap * tanh(logits / cap)`` where configured, else unchanged (for backends that read the unembedding)."""
    spec = spec_of(model)
    cap = getattr(_text_config(_config(model)), spec.logit_softcap_key, None) if spec.logit_softcap_key else None
    return torch.tanh(logits / cap) * cap if cap else logits


def block_part(model: nn.Module, layer: int, part: str) -> nn.Module:
    """A named module inside block ``layer``; ``part`` is one of :data:`BLOCK_PARTS`.

    ``resid_mid`` is the module whose *input* is the residual stream between attention and MLP (not the stream
    itself); ``attn_post_norm`` / ``mlp_post_norm`` exist only where the family normalises sublayer outputs.
    Raises ``ValueError`` naming the architecture and part where it has none (``resid_mid`` of parallel GPT-NeoX).
    """
    spec = spec_of(model)
    paths = {
        "attn": spec.attn,
        "attn_out_proj": spec.attn_out_proj,
        "mlp": spec.mlp,
        "resid_mid": resid_mid_module(model),
        "attn_post_norm": spec.attn_post_norm,
        "mlp_post_norm": spec.mlp_post_norm,
    }
    if part not in paths:
        raise ValueError(f"unknown block part {part!r}; expected one of {', '.join(BLOCK_PARTS)}")
    if paths[part] is None:
        why = " (attention and MLP run in parallel off resid_pre)" if part == "resid_mid" else ""
        raise ValueError(f"{spec.name} blocks have no {part!r} module{why}")
    return get_module(blocks(model)[layer], paths[part])


def residual_contribution(model: nn.Module, layer: int, sublayer: str) -> nn.Module:
    """The module whose output block ``layer`` adds to the residual stream for ``sublayer`` (``"attn"`` / ``"mlp"``).

    That is the sublayer itself, or its post-norm in Gemma 2/3 and OLMo-2. Its output may be a tuple whose ``[0]`` is
    the tensor (attention modules).
    """
    if sublayer not in ("attn", "mlp"):
        raise ValueError(f"sublayer must be 'attn' or 'mlp', not {sublayer!r}")
    post = spec_of(model).attn_post_norm if sublayer == "attn" else spec_of(model).mlp_post_norm
    return block_part(model, layer, f"{sublayer}_post_norm" if post else sublayer)


def site_hook_point(model: nn.Module, layer: int, site: str) -> tuple[nn.Module, str]:
    """The module to hook for ``site`` of block ``layer`` and whether the site is its ``"input"`` or ``"output"``.

    * ``resid_pre``: input of the block. Register a forward *pre*-hook ``with_kwargs=True``: the hidden states are
      ``args[0]`` when the decoder passes them positionally (all supported models do today) or
      ``kwargs["hidden_states"]``;
    * ``resid_post``: output of the block -- a tensor, or a tuple whose ``[0]`` is the tensor;
    * ``resid_mid``: ``args[0]`` of :func:`resid_mid_module` (``ValueError`` for parallel GPT-NeoX);
    * ``attn_out``: output of the attention module, a tuple ``(out, weights)`` whose ``[0]`` is ``[batch, pos, d_model]``
      (before any post-norm: see :func:`residual_contribution`);
    * ``mlp_out``: output of the MLP, ``[batch, pos, d_model]``;
    * ``head``: ``args[0]`` of the attention output projection, ``[batch, pos, n_heads * head_dim]`` with head ``h`` in
      columns ``h*head_dim:(h+1)*head_dim`` (also for GPT-2's ``Conv1D`` ``c_proj``).

    :func:`hook_site` does this unpacking for you.
    """
    where = {
        "resid_pre": (None, "input"),
        "resid_post": (None, "output"),
        "resid_mid": ("resid_mid", "input"),
        "attn_out": ("attn", "output"),
        "mlp_out": ("mlp", "output"),
        "head": ("attn_out_proj", "input"),
    }
    if site not in where:
        raise ValueError(f"unknown site {site!r}; expected one of {', '.join(SITES)}")
    part, direction = where[site]
    module = blocks(model)[layer] if part is None else block_part(model, layer, part)
    return module, direction


def hook_site(model: nn.Module, layer: int, site: str, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """Register ``fn(activation) -> replacement | None`` on ``site`` of block ``layer``; returns the removable handle.

    ``fn`` sees the site's tensor already unpacked (whether it arrives positionally, as ``hidden_states=`` or as a
    tuple's ``[0]``); returning a tensor replaces it in the forward, returning ``None`` leaves it (for caching).
    """
    module, direction = site_hook_point(model, layer, site)
    if direction == "input":

        def pre_hook(mod, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod, args, out):
        new = fn(out[0] if isinstance(out, tuple) else out)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(hook)


def hook_site_write(model: nn.Module, layer: int, site: str, fn: Callable[[Tensor], Tensor]) -> list[RemovableHandle]:
    """Make ``site`` of block ``layer`` *be* ``fn(activation)`` downstream; returns the handles to remove.

    For every site but ``resid_mid`` that is :func:`hook_site`. ``resid_mid`` is not a tensor any module receives
    whole (the MLP's norm reads it, the residual add reads it again), so writing the norm's input would patch the MLP
    path only. Instead the module whose output joins the stream after attention (:func:`residual_contribution`) gets
    ``new - resid_pre`` at the entries ``fn`` changed, so that ``resid_pre + contribution`` is the new value.
    """
    if site != "resid_mid":
        return [hook_site(model, layer, site, fn)]
    block_part(model, layer, "resid_mid")  # raises for parallel-residual blocks
    pre: list[Tensor] = []
    h0 = hook_site(model, layer, "resid_pre", lambda t: pre.append(t))

    def hook(mod, args, out):
        contrib = out[0] if isinstance(out, tuple) else out
        resid_pre = pre.pop()
        mid = resid_pre + contrib
        new = fn(mid)
        changed = (new != mid).any(-1, keepdim=True)
        contrib = torch.where(changed, new - resid_pre, contrib)
        return (contrib, *out[1:]) if isinstance(out, tuple) else contrib

    h1 = residual_contribution(model, layer, "attn").register_forward_hook(hook)
    return [h0, h1]


# ------------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class _Layout:
    """How one parameter's entries map onto units: its shape, the axis carrying units, and per unit kind a label
    for each index along that axis (-1: the index belongs to no unit of that kind)."""

    shape: tuple[int, ...]
    axis: int
    labels: Mapping[str, Tensor] = field(hash=False)
    n_units: Mapping[str, int] = field(hash=False)


def _split(name: str, spec: ArchSpec) -> tuple[int, str] | None:
    match = re.fullmatch(re.escape(spec.blocks) + r"\.(\d+)\.(.+)", name)
    return (int(match[1]), match[2]) if match else None


def layer_of(name: str, model_or_config: nn.Module | PreTrainedConfig) -> int | None:
    """Block index of an HF parameter name (``"model.layers.3.mlp.up_proj.weight"`` -> 3); ``None`` outside blocks.

    Names are the ``*ForCausalLM``'s ``named_parameters()`` names; a prefixed name (a wrapper's) is not a block's.
    """
    found = _split(name, spec_of(model_or_config))
    return found[0] if found else None


def matrix_kind(name: str, model_or_config: nn.Module | PreTrainedConfig) -> str | None:
    """Layout kind of a block weight matrix (``"q"``, ``"qkv_neox"``, ``"mlp_out_conv1d"`` ...); ``None`` otherwise."""
    spec = spec_of(model_or_config)
    found = _split(name, spec)
    return spec.matrices.get(found[1]) if found else None


def is_block_matrix(name: str, model_or_config: nn.Module | PreTrainedConfig) -> bool:
    """Whether a parameter is an attention or MLP weight matrix of a block: the default selection for masks.

    Excludes embeddings, unembedding, every norm (including Qwen 3 / OLMo-2 / Gemma 3 ``q_norm`` / ``k_norm``) and
    biases.
    """
    return matrix_kind(name, model_or_config) is not None


@lru_cache(maxsize=256)
def _weight_layout(kind: str, d: Dims) -> _Layout:
    H, KV, hd, F, D = d.n_heads, d.n_kv_heads, d.head_dim, d.d_mlp, d.d_model
    q, kv, neuron = torch.arange(H).repeat_interleave(hd), torch.arange(KV).repeat_interleave(hd), torch.arange(F)

    def none(n: int) -> Tensor:
        return torch.full((n,), -1)

    n_units = {"q_heads": H, "kv_heads": KV, "neurons": F}
    if kind in ("q", "k", "v"):
        out = (H if kind == "q" else KV) * hd
        return _Layout((out, D), 0, {"q_heads": q} if kind == "q" else {"kv_heads": kv}, n_units)
    if kind in ("qkv_concat", "qkv_conv1d"):
        # [q | k | v] along the output axis; GPT-2 has no GQA, so there KV == H and the three parts are equal.
        labels = {"q_heads": torch.cat([q, none(2 * KV * hd)]), "kv_heads": torch.cat([none(H * hd), kv, kv])}
        out = (H + 2 * KV) * hd
        conv = kind == "qkv_conv1d"
        return _Layout((D, out) if conv else (out, D), 1 if conv else 0, labels, n_units)
    if kind == "qkv_neox":
        # Rows are viewed as [n_heads, 3, hd] by the modeling code: row r is head r // (3*hd), part (r // hd) % 3.
        r = torch.arange(3 * H * hd)
        head, part = r // (3 * hd), (r // hd) % 3
        labels = {"q_heads": torch.where(part == 0, head, -1), "kv_heads": torch.where(part > 0, head, -1)}
        return _Layout((3 * H * hd, D), 0, labels, n_units)  # GPT-NeoX has no GQA: KV == H
    if kind == "o":
        return _Layout((D, H * hd), 1, {"q_heads": q}, n_units)
    if kind == "o_conv1d":
        return _Layout((H * hd, D), 0, {"q_heads": q}, n_units)
    if kind == "mlp_in":
        return _Layout((F, D), 0, {"neurons": neuron}, n_units)
    if kind == "mlp_in_fused":
        return _Layout((2 * F, D), 0, {"neurons": torch.cat([neuron, neuron])}, n_units)
    if kind == "mlp_in_conv1d":
        return _Layout((D, F), 1, {"neurons": neuron}, n_units)
    if kind == "mlp_out":
        return _Layout((D, F), 1, {"neurons": neuron}, n_units)
    if kind == "mlp_out_conv1d":
        return _Layout((F, D), 0, {"neurons": neuron}, n_units)
    raise ValueError(f"unknown layout kind {kind!r}")


def _layout(name: str, model_or_config: nn.Module | PreTrainedConfig) -> _Layout:
    spec = spec_of(model_or_config)
    found = _split(name, spec)
    suffix = found[1] if found else ""
    is_bias = suffix.endswith(".bias")
    kind = spec.matrices.get(suffix[: -len(".bias")] + ".weight" if is_bias else suffix)
    if kind is None:
        raise ValueError(f"{name!r} is not a block attention/MLP weight (or its bias) of {spec.name}")
    weight = _weight_layout(kind, dims(model_or_config))
    if not is_bias:
        return weight
    # A bias runs along its weight's output axis (Linear: rows, Conv1D: columns); it belongs to units only when the
    # weight's units sit on that axis (q/k/v/mlp_in, not o/mlp_out).
    out_axis = 1 if kind.endswith("conv1d") else 0
    labels = weight.labels if weight.axis == out_axis else {}
    return _Layout((weight.shape[out_axis],), 0, labels, weight.n_units)


def param_shape(name: str, model_or_config: nn.Module | PreTrainedConfig) -> tuple[int, ...]:
    """The shape a block weight (or its bias) must have, derived from the config and its layout kind."""
    return _layout(name, model_or_config).shape


def _check_shape(name: str, lay: _Layout, shape: Sequence[int]) -> None:
    if tuple(shape) != lay.shape:
        raise ValueError(f"{name!r} should have shape {lay.shape} for this config, got {tuple(shape)}")


def unit_counts(name: str, values: Tensor, model_or_config: nn.Module | PreTrainedConfig) -> dict[str, Tensor]:
    """Sum a parameter-shaped tensor (a mask, scores, ``|grad|``) over each unit's entries.

    Returns ``{unit: [n_units]}`` for the units this parameter has: ``q_heads`` ``[n_heads]``, ``kv_heads``
    ``[n_kv_heads]`` (for GPT-NeoX / GPT-2, whose fused weights have no GQA, ``[n_heads]``), ``neurons`` ``[d_mlp]``.
    A fused ``qkv`` weight yields both head kinds; an output projection's columns (GPT-2: rows) count for the query
    head they read; both halves of Phi-3's ``gate_up_proj`` count for the same neuron. Over all keys the sums add up
    to ``values.sum()`` for weights. Boolean / integer inputs are summed in float64 (exact counts); float inputs keep
    their dtype. Biases of ``o`` / ``mlp_out`` weights return ``{}``.
    """
    lay = _layout(name, model_or_config)
    _check_shape(name, lay, values.shape)
    v = values if values.is_floating_point() else values.double()
    per_index = v.sum(dim=[a for a in range(v.ndim) if a != lay.axis]) if v.ndim > 1 else v
    out = {}
    for unit, labels in lay.labels.items():
        labels = labels.to(per_index.device)
        keep = labels >= 0
        out[unit] = per_index.new_zeros(lay.n_units[unit]).index_add_(0, labels[keep], per_index[keep])
    return out


def unit_index(
    name: str, model_or_config: nn.Module | PreTrainedConfig, unit: str, index: int
) -> Bool[Tensor, "*shape"]:
    """Boolean mask, shaped like the parameter, of the entries belonging to unit ``index`` of kind ``unit``.

    ``unit_index("model.layers.0.self_attn.q_proj.weight", model, "q_heads", 3)`` selects query head 3's rows; for
    a fused weight it selects only that unit's part (GPT-NeoX: head 3's query rows inside its interleaved block).
    ``values[unit_index(...)].sum()`` equals ``unit_counts(...)[unit][index]``.
    """
    lay = _layout(name, model_or_config)
    if unit not in lay.labels:
        raise ValueError(f"{name!r} has no {unit!r} units; it has {', '.join(lay.labels) or 'none'}")
    if not 0 <= index < lay.n_units[unit]:
        raise IndexError(f"{unit} index {index} out of range [0, {lay.n_units[unit]})")
    selected = lay.labels[unit] == index
    view = [1] * len(lay.shape)
    view[lay.axis] = -1
    return selected.view(view).expand(lay.shape).contiguous()


def unit_sizes(name: str, shape: Sequence[int], model_or_config: nn.Module | PreTrainedConfig) -> dict[str, float]:
    """How many entries of a parameter of this ``shape`` each unit owns (all units of a kind own equally many).

    The denominators for fractions: ``unit_counts(name, mask, m)[u] / unit_sizes(name, mask.shape, m)[u]``.
    Computed from the layout, without materialising a tensor of ones.
    """
    lay = _layout(name, model_or_config)
    _check_shape(name, lay, shape)
    numel = 1
    for size in lay.shape:
        numel *= size
    across = numel // lay.shape[lay.axis]
    return {u: float(int((lab >= 0).sum()) * across / lay.n_units[u]) for u, lab in lay.labels.items()}


# ------------------------------------------------------------------------------------------------ the fast path
# Families whose blocks are exactly: pre-norm -> attention with separate q/k/v/o projections, full rotary
# embeddings (optionally a per-head q/k norm) -> residual add -> pre-norm -> MLP -> residual add. For these the
# patching engine re-implements one block on packed, ragged tokens (mechrecall.patching.core._ragged_forward).
_FAST = {
    "llama": ("self_attn", "input_layernorm", "post_attention_layernorm", None),
    "mistral": ("self_attn", "input_layernorm", "post_attention_layernorm", None),
    "qwen2": ("self_attn", "input_layernorm", "post_attention_layernorm", None),
    "qwen3": ("self_attn", "input_layernorm", "post_attention_layernorm", ("q_norm", "k_norm")),
}


@dataclass(frozen=True)
class FastBlock:
    """The modules of one block of a :data:`_FAST` family, for engines that run a block on packed tokens.

    ``q``/``k``/``v``/``o`` are the projections; ``q_norm``/``k_norm`` per-head norms applied before the rotary
    embedding (Qwen3) or ``None``; ``attn`` is the attention module (``head_dim``, ``scaling``, ``num_key_value_groups``
    attributes, used by ``eager_attention``).
    """

    attn: nn.Module
    attn_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    mlp_norm: nn.Module
    mlp: nn.Module


def fast_blocks(model: nn.Module, max_len: int) -> list[FastBlock] | None:
    """Every block as a :class:`FastBlock`, or ``None`` when the model is not of that form for prompts of
    ``max_len`` tokens (another family, sliding-window attention that would bind, a non-default rotary type)."""
    spec = spec_of(model)
    if spec.name not in _FAST:
        return None
    config = _text_config(_config(model))
    window = getattr(config, "sliding_window", None)
    if window is not None and (getattr(config, "use_sliding_window", True) or spec.name == "mistral"):
        if max_len > window:
            return None
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "dynamic", "llama3", "yarn"):
        return None
    attn_path, n1, n2, qk = _FAST[spec.name]
    out = []
    for block in blocks(model):
        attn = get_module(block, attn_path)
        out.append(
            FastBlock(
                attn, get_module(block, n1), attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                getattr(attn, qk[0]) if qk else None, getattr(attn, qk[1]) if qk else None,
                get_module(block, n2), get_module(block, spec.mlp),
            )
        )  # fmt: skip
    return out


def rotary_tables(model: nn.Module, like: Tensor, n_pos: int) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[n_pos, head_dim]`` of the model's rotary embedding for positions ``0..n_pos-1``."""
    rotary = get_module(base_model(model), "rotary_emb")
    cos, sin = rotary(like, torch.arange(n_pos, device=like.device)[None])
    return cos[0], sin[0]


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_attention(block: FastBlock, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``softmax(q k^T * scaling + mask) v`` with grouped key/value heads, as the family's eager attention computes it
    (``q`` ``[rows, heads, T_q, d]``, ``k``/``v`` ``[rows, kv_heads, T, d]``); returns ``[rows, T_q, heads, d]``."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    out, _ = eager_attention_forward(block.attn, q, k, v, mask, scaling=block.attn.scaling)
    return out


# ------------------------------------------------------------------------------------------------ paths and places
def site_path(model_or_config: nn.Module | PreTrainedConfig, layer: int, site: str) -> tuple[str, str]:
    """Dotted path (from the ``*ForCausalLM``) of the module :func:`site_hook_point` hooks, and ``"input"``/``"output"``.

    For wrappers that mirror the Hugging Face module tree without being it (nnsight's ``TransformersModel`` envoys):
    resolve the path on the wrapper by attribute access (integer parts index). Needs only the config.
    ``ValueError`` for an unknown site or ``resid_mid`` of a parallel-residual model, as :func:`block_part`.
    """
    spec = spec_of(model_or_config)
    where = {
        "resid_pre": ("", "input"),
        "resid_post": ("", "output"),
        "resid_mid": (resid_mid_module(model_or_config), "input"),
        "attn_out": (spec.attn, "output"),
        "mlp_out": (spec.mlp, "output"),
        "head": (spec.attn_out_proj, "input"),
    }
    if site not in where:
        raise ValueError(f"unknown site {site!r}; expected one of {', '.join(SITES)}")
    inner, direction = where[site]
    if inner is None:
        raise ValueError(
            f"{spec.name} blocks have no 'resid_mid' module (attention and MLP run in parallel off resid_pre)"
        )
    block = f"{spec.blocks}.{int(layer)}"
    return (f"{block}.{inner}" if inner else block), direction


PARAM_PARTS = ("embed", "pos_embed", "attn", "mlp", "block", "final_norm", "unembed")


@dataclass(frozen=True)
class ParamPlace:
    """Where a parameter sits in its architecture's module tree (:func:`place_of`).

    ``part`` is one of :data:`PARAM_PARTS`: ``attn`` / ``mlp`` (inside a block's attention / MLP module), ``block``
    (elsewhere in a block: its norms), ``embed``, ``pos_embed`` (GPT-2), ``final_norm``, ``unembed``. ``layer`` is the
    block index (``None`` outside blocks); ``module`` the dotted path of the module holding the parameter, relative to
    the block for block parts and to the ``*ForCausalLM`` otherwise; ``kind`` the layout kind of a block weight matrix
    (:func:`matrix_kind`), else ``None``; ``spec`` the table row the place was read from.
    """

    part: str
    layer: int | None
    module: str
    kind: str | None
    spec: ArchSpec

    @property
    def leaf(self) -> str:
        """The last part of ``module`` (``"q_proj"``, ``"query_key_value"``, ``"ln_1"``, ``"embed_tokens"`` ...)."""
        return self.module.rpartition(".")[2]


def _place(name: str, spec: ArchSpec) -> ParamPlace | None:
    found = _split(name, spec)
    if found:
        layer, suffix = found
        inner = suffix.rpartition(".")[0]

        def under(path: str) -> bool:
            return inner == path or inner.startswith(path + ".")

        part = "attn" if under(spec.attn) else "mlp" if under(spec.mlp) else "block"
        return ParamPlace(part, layer, inner, spec.matrices.get(suffix), spec)
    module = name.rpartition(".")[0]
    for part, path in (
        ("embed", spec.embed),
        ("pos_embed", spec.pos_embed),
        ("final_norm", spec.final_norm),
        ("unembed", spec.unembed),
    ):
        if path is not None and module == path:
            return ParamPlace(part, None, module, None, spec)
    return None


def place_of(name: str, model_or_config: nn.Module | PreTrainedConfig | None = None) -> ParamPlace | None:
    """Where the HF parameter ``name`` sits (:class:`ParamPlace`); ``None`` for parameters the table does not place
    (Gemma 3's vision tower and projector, a wrapper's prefixed names).

    Without ``model_or_config`` the place is judged from the name alone: every row of the table is tried, rows that
    list the name as a block weight matrix are preferred (``...self_attn.qkv_proj.weight`` is Phi-3's), then the
    table's order; rows sharing a module tree agree on everything but ``kind`` and ``spec``, so for the supported
    families the answer is the one the model's own row gives, except that a name no row lists as a matrix is placed
    by the first row that knows its path.
    """
    if model_or_config is not None:
        return _place(name, spec_of(model_or_config))
    places = [p for p in (_place(name, spec) for spec in _TABLE) if p is not None]
    return next((p for p in places if p.kind is not None), places[0] if places else None)


def has_layout(name: str, model_or_config: nn.Module | PreTrainedConfig) -> bool:
    """Whether :func:`unit_counts` / :func:`unit_index` / :func:`unit_sizes` understand ``name``: a block weight
    matrix or the bias of one (an ``o`` / ``mlp_out`` bias has a layout but belongs to no unit)."""
    found = _split(name, spec_of(model_or_config))
    if not found:
        return False
    suffix = found[1]
    if suffix.endswith(".bias"):
        suffix = suffix[: -len(".bias")] + ".weight"
    return suffix in spec_of(model_or_config).matrices


# ------------------------------------------------------------------------------------------ attention implementation
def _all_configs(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct Hugging Face config a model's modules carry (a multimodal model's text and vision configs too)."""
    seen: dict[int, PreTrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig):
            seen.setdefault(id(config), config)
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if isinstance(sub, PreTrainedConfig):
                    seen.setdefault(id(sub), sub)
    return list(seen.values())


@contextmanager
def attention_implementation(model: nn.Module, implementation: str = "eager") -> Iterator[nn.Module]:
    """Run ``model`` with another attention implementation inside the block, and give the user's back after it.

    Models loaded with transformers' defaults use ``sdpa`` (or ``flash_attention_2`` where asked for), whose mask
    builder inspects the mask's values in Python: ``torch.func.vmap`` (per-example gradients) refuses that. The
    implementation is read from the configs at every forward, so switching them is enough; every config's setting is
    restored on exit, exceptions included. A model that does not support switching (its own attention classes) is left
    as it is and the caller's forward decides. Works on peft-wrapped models (their base model's configs are reached
    through ``modules()``)."""
    configs = _all_configs(model)
    before = [(c, getattr(c, "_attn_implementation_internal", None)) for c in configs]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    try:
        if current != implementation and hasattr(inner, "set_attn_implementation"):
            try:
                inner.set_attn_implementation(implementation)
            except (ValueError, ImportError):  # an implementation this model or machine cannot switch to
                pass
        yield model
    finally:
        for config, value in before:
            config._attn_implementation_internal = value
