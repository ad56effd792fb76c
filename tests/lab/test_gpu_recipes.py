"""The GPU recipes (``pythia-2.8b``, ``llama-3.2-3b``): valid for the real models' configurations, without weights.

The hub cannot be reached here, so each model is built on the ``meta`` device from its published ``config.json``
values (written out below): the architecture layer knows it, its block class is one the FSDP config names, and the
parameter count is the model's. A tiny model of the same family
then trains both regimes for a step under the recipe's stage settings (the code path a GPU run takes, at test size).
"""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from mechrecall import arch
from mechrecall.lab.config import get_preset

# config.json of EleutherAI/pythia-2.8b and meta-llama/Llama-3.2-3B (the fields that set shapes)
CONFIGS = {
    "pythia-2.8b": lambda: GPTNeoXConfig(
        hidden_size=2560, intermediate_size=10240, num_attention_heads=32, num_hidden_layers=32, rotary_pct=0.25,
        vocab_size=50304, max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False,
    ),
    "llama-3.2-3b": lambda: LlamaConfig(
        hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=28, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    ),
}  # fmt: skip
PARAMS = {"pythia-2.8b": 2.775e9, "llama-3.2-3b": 3.213e9}
BLOCK = {"pythia-2.8b": "GPTNeoXLayer", "llama-3.2-3b": "LlamaDecoderLayer"}
SOURCE = {"pythia-2.8b": "EleutherAI/pythia-2.8b", "llama-3.2-3b": "meta-llama/Llama-3.2-3B"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recipe_fits_the_real_model(name):
    preset = get_preset(name)
    assert preset.model.source == SOURCE[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(PARAMS[name], rel=2e-3)
    assert arch.n_layers(model) == model.config.num_hidden_layers
    assert type(arch.blocks(model)[0]).__name__ == BLOCK[name]
    # full fine-tuning with AdamW keeps weights, gradients and two moments in float32: 16 bytes a parameter, more
    # than a 40 GB GPU holds (the FSDP config shards it); an 80 GB GPU holds it with room for activations (DDP)
    assert 40e9 < 16 * n < 60e9
    assert preset.trace is False and preset.data.name_style == "multi_token"
    for stage in (preset.mixed, preset.two_stage.stage1, preset.two_stage.stage2):
        assert stage.lr <= 1e-4 and stage.trainable == "all"


def test_fsdp_config_wraps_the_recipes_block_classes():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp-3b.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["num_processes"] == 8
    fsdp = cfg["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) >= set(BLOCK.values())
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("name, family", [("pythia-2.8b", "gpt_neox"), ("llama-3.2-3b", "llama")])
def test_recipe_trains_a_tiny_model_of_its_family(name, family, tmp_path):
    from mechrecall.lab.bios import generate
    from mechrecall.lab.train import train
    from tests.lab.test_pretrained import _bpe
    from tests.tiny_models import tiny_model

    small = ["data.n_people=12", "save_every=100"]
    ds = generate(get_preset(name, small).data.spec(), 0)
    tok = _bpe([*ds.documents(), *(ex.text for ex in ds.query_examples())])
    folder = tmp_path / "base"
    tiny_model(family, vocab_size=512).save_pretrained(folder)
    tok.save_pretrained(folder)
    overrides = [*small, f"model.source={folder}", "mixed.steps=2", "mixed.eval_every=2", "mixed.batch_storage=4",
                 "mixed.batch_query=4", "two_stage.stage1.steps=2", "two_stage.stage1.batch_storage=4",
                 "two_stage.stage2.steps=2", "two_stage.stage2.batch_query=4", "two_stage.stage2.eval_every=2"]  # fmt: skip
    preset = get_preset(name, overrides)
    for regime in ("two_stage", "mixed"):
        meta = train(preset, regime, tmp_path / "run", progress=False)
        assert meta["config"]["name"] == name and meta["global_step"] == (4 if regime == "two_stage" else 2)
        assert all(0 <= meta["metrics"][k] <= 1 for k in ("heldout_qa", "trained_qa", "storage"))
