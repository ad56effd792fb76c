import pytest
import torch
from safetensors.torch import load_file

from mechrecall.lab.config import get_preset
from mechrecall.lab.train import batch_rows, lr_at, train

SHORT = [
    "mixed.steps=24",
    "mixed.eval_every=8",
    "save_every=10",
    "two_stage.stage1.steps=16",
    "two_stage.stage2.steps=16",
    "two_stage.stage2.eval_every=8",
]


def _weights(run, regime):
    return load_file(run / regime / "final" / "model.safetensors")


@pytest.mark.parametrize(
    "regime, extra",
    [
        ("mixed", []),
        ("two_stage", []),
        ("two_stage", ["two_stage.stage2.trainable=lora", "two_stage.stage2.lora_embedding_rank=4"]),
    ],
)
def test_resume_after_interruption_gives_identical_weights(tmp_path, regime, extra):
    preset = get_preset("micro", SHORT + extra)
    full = train(preset, regime, tmp_path / "full", progress=False)
    cut = 23 if regime == "two_stage" else 13  # mid stage 2 / mid run, past a saved checkpoint
    assert train(preset, regime, tmp_path / "cut", progress=False, stop_after=cut) == {"interrupted_at": cut}
    assert not (tmp_path / "cut" / regime / "final").exists()
    resumed = train(preset, regime, tmp_path / "cut", progress=False)
    a, b = _weights(tmp_path / "full", regime), _weights(tmp_path / "cut", regime)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["metrics"]["heldout_qa"] == full["metrics"]["heldout_qa"]


def test_batches_are_a_function_of_seed_stage_step():
    a = batch_rows(10, 4, 7, seed=0, stage=1)
    assert torch.equal(a, batch_rows(10, 4, 7, seed=0, stage=1))
    assert not torch.equal(batch_rows(10, 4, 7, seed=1, stage=1), a)
    epoch = torch.cat([batch_rows(10, 5, s, 0, 0) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch visits every row once


def test_lr_schedule():
    cfg = get_preset("micro").mixed.model_copy(update={"steps": 110, "warmup": 10, "lr": 1.0, "min_lr_ratio": 0.1})
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 110) == pytest.approx(0.1)


def test_unknown_regime():
    with pytest.raises(ValueError, match="unknown regime 'both'"):
        train(get_preset("micro"), "both", "/nonexistent")


def test_gradient_checkpointing_and_bf16_autocast_are_options(tmp_path):
    """Checkpointing recomputes the same activations (same weights); bf16 autocast trains float32 weights close by."""
    preset = get_preset("micro", ["data.n_people=40", "mixed.steps=8", "mixed.eval_every=8", "save_every=100"])
    plain = train(preset, "mixed", tmp_path / "plain", progress=False)
    ckpt = train(preset, "mixed", tmp_path / "ckpt", progress=False, gradient_checkpointing=True)
    amp = train(preset, "mixed", tmp_path / "amp", progress=False, autocast="bf16")
    a, b, c = (_weights(tmp_path / r, "mixed") for r in ("plain", "ckpt", "amp"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
        assert c[k].dtype == torch.float32
    drift = max(float((a[k] - c[k]).abs().max()) for k in a)
    assert 0 < drift < 0.05  # bf16 forwards move the weights a little, not a lot
    assert ckpt["metrics"]["storage"] == plain["metrics"]["storage"]
    assert 0 <= amp["metrics"]["storage"] <= 1


def test_training_on_a_missing_device_fails_in_one_line(tmp_path, capsys):
    from mechrecall.lab.train import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--preset", "micro", "--regime", "mixed", "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device 'cuda': no CUDA GPU is available on this machine"]
    assert not (tmp_path / "x" / "mixed").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu(tmp_path):
    preset = get_preset("micro", ["mixed.steps=8", "mixed.eval_every=8", "save_every=100"])
    train(preset, "mixed", tmp_path / "cpu", progress=False)
    train(preset, "mixed", tmp_path / "gpu", progress=False, device="cuda")
    a, b = _weights(tmp_path / "cpu", "mixed"), _weights(tmp_path / "gpu", "mixed")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_pre_instruction_regime_trains_qa_first_then_both_formats(tmp_path):
    """The third regime: QA of the trained half alone, then biographies and QA together (its own folder)."""
    import json

    preset = get_preset("micro", ["data.n_people=40", "pre_instruction.qa.steps=6", "pre_instruction.qa.eval_every=3",
                                  "pre_instruction.joint.steps=6", "pre_instruction.joint.eval_every=3",
                                  "save_every=100"])  # fmt: skip
    meta = train(preset, "pre-instruction", tmp_path, progress=False)
    assert (tmp_path / "pre_instruction" / "qa").is_dir() and meta["regime"] == "pre_instruction"
    history = json.loads((tmp_path / "pre_instruction" / "history.json").read_text())
    qa = [h for h in history if h["stage"] == "qa"]
    joint = [h for h in history if h["stage"] == "joint"]
    assert qa and joint and all("loss_storage" not in h for h in qa) and all("loss_storage" in h for h in joint)
    assert set(meta["stages"]) == {"qa", "joint"}
    with pytest.raises(ValueError, match="has no pre_instruction section"):
        train(get_preset("smollm2"), "pre_instruction", tmp_path / "x", progress=False)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text", "gemma3", "gpt_neox", "gpt2", "phi3"])
def test_scored_logits_loss_equals_the_full_logits_loss(arch):
    """Logits at the scored positions only (``scored_logits=True``) give the same loss and the same gradients as the
    model's own forward over every position, on every family's layout (tied / untied unembedding, Gemma 2's logit
    soft-capping, the multimodal Gemma 3's nested decoder), with padding and rows that score only a suffix; so do
    the multi-process loss's scored path and a LoRA-adapted model's."""
    import copy

    from mechrecall.lab.train import lm_loss
    from mechrecall.tokenization import Batch
    from tests.tiny_models import tiny_model

    model = copy.deepcopy(tiny_model(arch, vocab_size=128))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    labels = torch.full_like(ids, -100)
    labels[0] = ids[0]  # a biography: every token scored
    labels[1, 3:6] = ids[1, 3:6]  # a QA row: the answer only
    labels[2, 7:] = ids[2, 7:]
    batch = Batch(ids, mask, labels)
    from mechrecall.lab.distributed import Processes, sharded_lm_loss

    losses, grads = [], []
    for loss_fn in (
        lambda: lm_loss(model, batch),
        lambda: lm_loss(model, batch, scored_logits=True),
        # the multi-process loss's scored path (logits_to_keep through the wrapper's forward), here in one process
        lambda: sharded_lm_loss(model, batch, Processes(), scored_logits=True),
    ):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-6)
        assert grad.keys() == grads[0].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grad[name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_scored_logits_loss_of_a_lora_model_equals_the_full_logits_loss():
    """Through peft's wrapper the scored path unembeds the base model's states with the adapters in place."""
    import copy

    from mechrecall.lab.adapters import apply_lora
    from mechrecall.lab.config import StageConfig
    from mechrecall.lab.train import lm_loss
    from mechrecall.tokenization import Batch
    from tests.tiny_models import tiny_model

    cfg = StageConfig(steps=1, lr=1e-3, trainable="lora", lora_targets=("q_proj", "v_proj"))
    model, params = apply_lora(copy.deepcopy(tiny_model("llama", vocab_size=128)), cfg, seed=0)
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 2:4] = ids[1, 2:4]
    batch = Batch(ids, torch.ones_like(ids), labels)
    losses, grads = [], []
    for scored in (False, True):
        model.zero_grad()
        loss = lm_loss(model, batch, scored_logits=scored)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(bool(g.abs().sum() > 0) for g in grads[1])


def test_plateau_rule_by_hand():
    from mechrecall.lab.train import plateaued

    assert not plateaued([0.1, 0.2], 2, 0.01)  # not enough evaluations to have a plateau
    assert plateaued([0.1, 0.3, 0.305, 0.31], 2, 0.01)  # the last two beat 0.3 by at most 0.01
    assert not plateaued([0.1, 0.3, 0.305, 0.32], 2, 0.01)
    assert plateaued([0.5, 0.2, 0.1], 2, 0.0)  # falling is a plateau too


def test_mixed_stops_on_a_validation_plateau_and_says_so(tmp_path):
    # a delta of 1 makes any second evaluation a plateau: the run stops at 2 x eval_every of its 24 steps
    preset = get_preset("micro", SHORT + ["mixed.stop_at_plateau=1", "mixed.plateau_delta=1.0"])
    meta = train(preset, "mixed", tmp_path, progress=False)
    assert meta["metrics"]["steps"] == 16 and meta["metrics"]["stopped_early"]
    with pytest.raises(ValueError, match="stop_at_plateau reads validation QA"):
        get_preset("micro", ["two_stage.stage1.stop_at_plateau=2"])


def test_a_plateau_rule_without_validation_people_is_refused():
    with pytest.raises(ValueError, match="validation_fraction must be above 0"):
        get_preset("micro", ["mixed.stop_at_plateau=2", "data.validation_fraction=0"])
