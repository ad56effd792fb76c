"""The per-format gradient trace: each format's own gradient, update attribution, persistence and resume."""

import pytest
import torch
from safetensors.torch import load_file

from mechrecall.lab.config import get_preset
from mechrecall.lab.trace import GradientTrace
from mechrecall.lab.train import train


def test_capture_separates_formats_and_update_attribution():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    xa, xb = torch.randn(4, 3), torch.randn(5, 3)
    ga = torch.autograd.grad(lin(xa).pow(2).mean(), list(lin.parameters()))
    gb = torch.autograd.grad(lin(xb).sum(), list(lin.parameters()))
    tr = GradientTrace()
    lin(xa).pow(2).mean().backward()
    tr.capture("storage", lin)
    lin(xb).sum().backward()
    tr.capture("query", lin)
    tr.before_update(lin)
    before = [p.detach().clone() for p in lin.parameters()]
    torch.optim.SGD(lin.parameters(), lr=0.1).step()
    tr.record_update(lin)
    for (name, p), a, b, p0 in zip(lin.named_parameters(), ga, gb, before):
        assert torch.allclose(tr.mean_abs_grad("storage")[name], a.abs(), atol=1e-6)
        assert torch.allclose(tr.mean_abs_grad("query")[name], b.abs(), atol=1e-6)
        delta = p.detach() - p0
        assert torch.allclose(tr.grad_x_update("query")[name], (b * delta).abs(), atol=1e-7)
    assert tr.steps == {"storage": 1, "query": 1}


def test_trace_is_saved_with_checkpoints_and_identical_after_resume(tmp_path):
    preset = get_preset("micro", ["mixed.steps=12", "mixed.eval_every=6", "save_every=5"])
    train(preset, "mixed", tmp_path / "full", progress=False)
    train(preset, "mixed", tmp_path / "cut", progress=False, stop_after=7)
    train(preset, "mixed", tmp_path / "cut", progress=False)
    a = GradientTrace.load(tmp_path / "full" / "mixed" / "final")
    b = GradientTrace.load(tmp_path / "cut" / "mixed" / "final")
    assert a.steps == b.steps == {"storage": 12, "query": 12}
    for kind in ("abs_grad", "grad_x_update"):
        for fmt in ("storage", "query"):
            for n, t in a.sums[kind][fmt].items():
                assert torch.equal(t, b.sums[kind][fmt][n]), (kind, fmt, n)


def test_two_stage_trace_covers_both_stages(tmp_path):
    preset = get_preset(
        "micro", ["two_stage.stage1.steps=6", "two_stage.stage2.steps=4", "two_stage.stage2.stop_at_trained_qa=null"]
    )
    train(preset, "two_stage", tmp_path, progress=False)
    stage1 = GradientTrace.load(tmp_path / "two_stage" / "stage1")
    final = GradientTrace.load(tmp_path / "two_stage" / "final")
    assert stage1.steps == {"storage": 6} and final.steps == {"storage": 6, "query": 4}
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(stage1.mean_abs_grad("storage")[name], final.mean_abs_grad("storage")[name])


@pytest.mark.parametrize("base_grads", [False, True])
def test_lora_stage_traces_adapter_factors_and_optionally_base_weights(tmp_path, base_grads):
    """A LoRA stage 2 traces its factors under HF-style names; with trace_base_grads also each frozen base weight's
    |dL/dW| under its usual name (the same quantity a full fine-tune traces), and the base weights never move."""
    preset = get_preset("micro", [
        "two_stage.stage1.steps=4", "two_stage.stage2.steps=3", "two_stage.stage2.stop_at_trained_qa=null",
        "two_stage.stage2.trainable=lora", f"two_stage.stage2.trace_base_grads={str(base_grads).lower()}",
        "two_stage.stage2.lora_embedding_rank=4",
    ])  # fmt: skip
    train(preset, "two_stage", tmp_path, progress=False)
    final = GradientTrace.load(tmp_path / "two_stage" / "final")
    query = final.mean_abs_grad("query")
    factors = {n for n in query if ".lora_" in n}
    # the tied unembedding's factors are views of the embedding's: traced once, under the embedding's names
    assert factors == {f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"} | {"model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"}  # fmt: skip
    updated = final.grad_x_update("query")
    assert set(updated) == factors  # base weights do not move, so they get no update record
    base = set(query) - factors
    if base_grads:
        assert "model.layers.0.mlp.up_proj.weight" in base and "model.layers.0.self_attn.q_proj.weight" in base
        assert all(float(query[n].abs().sum()) > 0 for n in base if "layers" in n)
    else:
        assert not base
    stage1 = load_file(tmp_path / "two_stage" / "stage1" / "model.safetensors")
    final_w = load_file(tmp_path / "two_stage" / "final" / "model.safetensors")
    assert torch.equal(stage1["model.layers.0.mlp.up_proj.weight"], final_w["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(
        stage1["model.layers.0.self_attn.q_proj.weight"], final_w["model.layers.0.self_attn.q_proj.weight"]
    )
