"""Ablation and grafting on state dicts: exact values, undo restores the original, temporary loading restores."""

import pytest
import torch

from mechrecall.interventions import ablate, graft, loaded, state_of
from mechrecall.masks import random_mask_like

W = "model.layers.0.mlp.up_proj.weight"


def _sd(v):
    return {W: torch.full((2, 3), float(v)), "model.norm.weight": torch.ones(3)}


MASK = {W: torch.tensor([[True, False, False], [False, True, True]])}


def test_ablation_modes():
    sd = {W: torch.arange(6.0).view(2, 3), "model.norm.weight": torch.ones(3)}
    base = _sd(-1)
    out = ablate(sd, MASK, "base", base)
    assert out[W].tolist() == [[-1, 1, 2], [3, -1, -1]]
    assert ablate(sd, MASK, "zero")[W].tolist() == [[0, 1, 2], [3, 0, 0]]
    assert ablate(sd, MASK, "mean")[W].tolist() == [[2, 1, 2], [3, 2, 2]]  # mean of unmasked 1, 2, 3
    assert out["model.norm.weight"] is sd["model.norm.weight"]  # untouched tensors are shared, not copied
    assert sd[W].tolist() == [[0, 1, 2], [3, 4, 5]]  # the input is not modified


def test_graft_takes_masked_entries_from_donor():
    out = graft(_sd(0), _sd(7), MASK)
    assert out[W].tolist() == [[7, 0, 0], [0, 7, 7]]


def test_undo_restores_the_original_exactly(micro_tokenizer):
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import build_model

    model = build_model(get_preset("micro").model, micro_tokenizer, seed=0)
    sd = {n: t.clone() for n, t in state_of(model).items()}
    base = {n: torch.randn_like(t) for n, t in sd.items()}
    mask = random_mask_like({n: torch.rand_like(t) < 0.1 for n, t in sd.items() if t.ndim == 2}, seed=1)
    for mode in ("base", "zero", "mean"):
        undone = graft(ablate(sd, mask, mode, base), sd, mask)
        assert all(torch.equal(undone[n], sd[n]) for n in sd)
    grafted = graft(sd, base, mask)
    assert all(torch.equal(graft(grafted, sd, mask)[n], sd[n]) for n in sd)
    # loading temporarily into the model and leaving restores its parameters
    with loaded(model, ablate(sd, mask, "zero")):
        assert not torch.equal(
            state_of(model)["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]
        )
    assert all(torch.equal(state_of(model)[n], sd[n]) for n in sd)


def test_errors_name_the_parameter():
    with pytest.raises(KeyError, match="up_proj"):
        ablate({"x": torch.zeros(2, 3)}, MASK, "zero")
    with pytest.raises(ValueError, match="base state dict"):
        ablate(_sd(0), MASK, "base")
    with pytest.raises(ValueError, match="mode"):
        ablate(_sd(0), MASK, "noise")
    with pytest.raises(ValueError, match="shape"):
        graft(_sd(0), {W: torch.zeros(3, 2), "model.norm.weight": torch.ones(3)}, MASK)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _random_mask(state, seed: int, p: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=g) < p for n, t in state.items() if t.ndim == 2}


def test_bfloat16_states_keep_their_dtype(micro_model):
    import copy

    model = copy.deepcopy(micro_model).to(torch.bfloat16)
    sd = {n: t.clone() for n, t in state_of(model).items()}
    mask = _random_mask(sd, seed=3)
    donor = {n: (t.float() + 1).to(torch.bfloat16) for n, t in sd.items()}
    for out in (
        ablate(sd, mask, "zero"),
        ablate(sd, mask, "mean"),
        ablate(sd, mask, "base", donor),
        graft(sd, donor, mask),
    ):
        for n, m in mask.items():
            assert out[n].dtype == torch.bfloat16
            assert not (out[n] != sd[n])[~m].any()  # nothing outside the mask moves
    grafted = graft(sd, donor, mask)
    assert all(torch.equal(grafted[n] != sd[n], m) for n, m in mask.items())
    fp32 = {n: t.float() for n, t in grafted.items()}  # a float32 state loads into a bfloat16 model (cast on copy)
    with loaded(model, fp32):
        assert all(torch.equal(p.detach(), grafted[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p.detach(), sd[n]) for n, p in model.named_parameters())


@needs_cuda
def test_cuda_model_loads_cpu_states_and_recalls_like_the_cpu(micro_model, micro_dataset, micro_tokenizer):
    import copy

    from mechrecall.interventions import recall_under

    facts = micro_dataset.factset(micro_dataset.pids("heldout")[:20])
    sd = {n: t.clone() for n, t in state_of(micro_model).items()}
    mask = _random_mask(sd, seed=4, p=0.02)
    cuda = copy.deepcopy(micro_model).to("cuda")
    on_cuda = state_of(cuda)
    base = {n: t + 1 for n, t in sd.items()}
    out = ablate(on_cuda, mask, "base", base=base)  # CPU mask and base, CUDA state
    assert all(out[n].device.type == "cuda" for n in mask)
    ref = ablate(sd, mask, "base", base=base)
    assert all(torch.equal(out[n].cpu(), ref[n]) for n in mask)
    zeroed = ablate(sd, mask, "zero")  # a CPU state into the CUDA model
    on_gpu = recall_under(cuda, micro_tokenizer, facts, zeroed)["heldout"]
    on_cpu = recall_under(micro_model, micro_tokenizer, facts, zeroed)["heldout"]
    assert abs(on_gpu - on_cpu) <= 0.05  # argmax ties may break differently
    assert all(torch.equal(p.detach().cpu(), sd[n]) for n, p in cuda.named_parameters())
