"""Build the lab's Llama-architecture models and save / load checkpoints as Hugging Face folders.

A checkpoint is a ``save_pretrained`` folder (``config.json``, ``model.safetensors``, tokenizer files) plus
``mechrecall.json`` (regime, stage, step, seed, dataset hash, metrics), written atomically: a crash mid-write leaves
the previous checkpoint in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from mechrecall.config import ModelConfig
from mechrecall.io import atomic_write_dir

META_FILE = "mechrecall.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or does not match what was asked for."""


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


def save_checkpoint(
    path: str | Path,
    model: PreTrainedModel,
    tokenizer,
    meta: dict,
    extra: dict | None = None,
    writers: tuple = (),
) -> Path:
    """Write ``model`` + ``tokenizer`` + ``meta`` (and optional ``extra`` torch objects) to ``path`` atomically.

    ``writers`` are callables ``f(folder)`` that add files (e.g. the gradient trace) inside the same atomic write.
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if extra is not None:
            torch.save(extra, tmp / "trainer_state.pt")
        for write in writers:
            write(tmp)

    return atomic_write_dir(path, fill)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
    meta = path / META_FILE
    return json.loads(meta.read_text()) if meta.exists() else {}


def load_checkpoint(path: str | Path) -> tuple[LlamaForCausalLM, object, dict]:
    """(model, tokenizer, meta) from a folder written by :func:`save_checkpoint` (eval mode, fp32, eager)."""
    path = Path(path)
    meta = read_meta(path)
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / needed).exists():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {needed} is missing")
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, meta
