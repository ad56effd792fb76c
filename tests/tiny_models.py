"""Tiny random Hugging Face causal LMs of every architecture ``mechrecall.arch`` supports, built offline from configs.

Each model has 2 blocks, ``d_model`` 64, 4 query heads of ``head_dim`` 16 (2 key/value heads where the family uses
grouped-query attention; GPT-2 and GPT-NeoX are multi-head only), an MLP of 128 neurons and 128 positions, in fp32,
transformers' default attention implementation (sdpa: the model object a user has) and eval mode. Family traits that change the layouts or the residual stream are kept as the real
checkpoints have them: embedding tying (Gemma, GPT-2, the small Llama/Qwen models tie; Pythia, Mistral, OLMo-2 and
Phi-3 do not), Pythia's partial rotary (25 %) and parallel residual, Gemma 2's attention and final-logit
soft-capping with a sliding window that fits the 128 positions.

``tiny_model`` caches what it builds per ``(arch, vocab_size, seed)`` and returns the *shared* instance, because
building the eleven models again for every test would cost more than the tests. Callers must not change it (weights,
hooks left registered, ``.train()``); a test that edits weights works on ``copy.deepcopy(tiny_model(...))``.

``vocab_size`` may go up to 49152 (SmolLM2's tokenizer) so tests can pair a model with a real BPE tokenizer; pad /
bos / eos are ids 0 / 1 / 2 as in SmolLM2, and the multimodal Gemma 3's image tokens take the last three ids (as in
the real checkpoints, whose image token is the vocabulary's end), so text ids below ``vocab_size - 3`` are plain text.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

ARCHS: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "olmo2",
    "phi3",
    "gpt_neox",
    "gpt2",
)

# Shared by the families with Llama-style configs.
_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=128,
)
_GEMMA = dict(
    query_pre_attn_scalar=16,  # = head_dim, as the real models (the default 256 assumes head_dim 256)
    sliding_window=16,  # shorter than the positions, so the sliding layer really is local
    layer_types=["sliding_attention", "full_attention"],  # one of each (the real pattern is 1:1 / 5:1)
)


def _config_kwargs(arch: str, vocab_size: int) -> dict:
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        # GPT-2's dropouts default to 0.1; zero them so a caller's .train() copy stays deterministic.
        drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        sizes = dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128)
        return dict(vocab_size=vocab_size, tie_word_embeddings=True, **sizes, **drop, **ids)
    if arch == "gpt_neox":
        sizes = {k: v for k, v in _SIZES.items() if k not in ("num_key_value_heads", "head_dim")}
        extra = dict(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)  # as Pythia
        return dict(vocab_size=vocab_size, **sizes, **extra, **ids)
    tie = {"llama": True, "qwen2": True, "qwen3": True, "gemma2": True, "gemma3_text": True}.get(arch, False)
    text = dict(vocab_size=vocab_size, tie_word_embeddings=tie, **_SIZES, **ids)
    if arch == "gemma2":
        text |= _GEMMA | dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)  # Gemma 2's values
    if arch == "gemma3_text":
        text |= _GEMMA
    if arch == "gemma3":
        text |= _GEMMA | dict(tie_word_embeddings=True)
        # A one-layer 2x2-patch vision tower: the smallest the projector accepts (4 image tokens = 2x2 pooled).
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        image_ids = dict(
            boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2, image_token_index=vocab_size - 1
        )
        return dict(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=True, **image_ids
        )
    return text


@functools.cache
def tiny_model(arch: str, vocab_size: int = 512, seed: int = 0, attn: str | None = None) -> PreTrainedModel:
    """A randomly initialised tiny ``arch`` causal LM (see the module docstring); shared, so do not modify it.

    ``attn=None`` keeps transformers' default attention implementation (``sdpa``), as a user's
    ``from_pretrained`` / ``from_config`` gives it; ``attn="eager"`` asks for eager attention."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if not 16 <= vocab_size <= 49152:
        raise ValueError(f"vocab_size must be in [16, 49152], got {vocab_size}")
    config = AutoConfig.for_model(arch, **_config_kwargs(arch, vocab_size))
    torch.manual_seed(seed)
    extra = {} if attn is None else {"attn_implementation": attn}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    return model.eval()
