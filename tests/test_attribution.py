"""Token-role attribution: integrated gradients equal Captum's, completeness, role partition, occlusion."""

import pytest
import torch

from mechrecall.attribution import (
    ROLES,
    attribute,
    baseline_embeds,
    gradient_x_input,
    integrated_gradients,
    occlusion_by_role,
    role_inputs,
    role_shares,
    to_dataframe,
)


@pytest.fixture(scope="module")
def setup(micro_dataset, micro_tokenizer, micro_model):
    return micro_model, micro_tokenizer, micro_dataset.storage_examples(micro_dataset.pids("heldout")[:2])


def test_integrated_gradients_match_captum(setup):
    from captum.attr import IntegratedGradients

    from mechrecall.attribution import _embeds, _target

    model, tok, examples = setup
    inputs = role_inputs(tok, examples[:6])
    ours = integrated_gradients(model, inputs, steps=16, max_steps=16)
    x = _embeds(model, inputs.input_ids)
    ig = IntegratedGradients(lambda e, readout, answer: _target(model, e, readout, answer))
    theirs, delta = ig.attribute(
        x,
        baselines=baseline_embeds(model, inputs),
        additional_forward_args=(inputs.readout, inputs.answer),  # Captum repeats them along its expanded batch
        n_steps=16,
        method="gausslegendre",
        return_convergence_delta=True,
    )
    assert torch.allclose(ours.attributions, theirs.sum(-1), atol=1e-4)
    assert torch.allclose(ours.delta, delta.float(), atol=1e-4)


def test_completeness_and_convergence(setup):
    model, tok, examples = setup
    inputs = role_inputs(tok, examples)
    r = integrated_gradients(model, inputs, steps=8, max_steps=128)
    assert r.converged and (r.delta.abs() <= 0.05 * r.gap.abs() + 1e-3).all()
    assert torch.allclose(r.attributions.sum(-1), r.gap, atol=0.05 * float(r.gap.abs().max()) + 1e-3)


def test_roles_partition_the_prompt(setup):
    model, tok, examples = setup
    inputs = role_inputs(tok, examples)
    stacked = torch.stack([inputs.roles[r] for r in ROLES]).long()
    assert (stacked.sum(0) + inputs.fixed.long() == 1).all()  # every position: exactly one role, or fixed
    assert inputs.roles["answer_preceding"].sum(1).eq(1).all()
    assert inputs.roles["subject"].any(1).all() and inputs.roles["relation"].any(1).all()
    shares = role_shares(gradient_x_input(model, inputs), inputs)
    assert torch.allclose(sum(shares.values()), torch.ones(len(examples)), atol=1e-5)


def test_occlusion_of_nothing_changes_nothing(setup):
    model, tok, examples = setup
    inputs = role_inputs(tok, examples[:4])
    inputs.roles = {"none": torch.zeros_like(inputs.fixed)}
    assert occlusion_by_role(model, inputs)["none"].abs().max() == 0


def test_attribute_summary(setup):
    model, tok, examples = setup
    r = attribute(model, tok, examples[:6], steps=8, max_steps=64)
    assert r["n"] == 6 and 0 <= r["subject_plus_relation_share"] <= r["subject_relation_preceding_share"] <= 1
    assert set(r["per_role"]) == set(ROLES) and sum(r["per_role"].values()) == pytest.approx(1, abs=1e-5)
    df = to_dataframe(r, "m")
    assert len(df) == 6 and df["ig_steps"].tolist() == r["ig_convergence"]["example_steps"]
    assert r["ig_convergence"]["n_unconverged"] == 0 and r["ig_convergence"]["converged"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bfloat16_model_attributes_in_float32_close_to_float32(setup):
    import copy

    model, tok, examples = setup
    inputs = role_inputs(tok, examples[:4])
    half = copy.deepcopy(model).to(torch.bfloat16)
    ref = integrated_gradients(model, inputs, steps=16, max_steps=16)
    got = integrated_gradients(half, inputs, steps=16, max_steps=64)
    assert got.attributions.dtype == got.delta.dtype == got.gap.dtype == torch.float32
    assert (got.delta.abs() <= 0.05 * got.gap.abs() + 1e-2).all()  # bf16 forwards: a looser completeness gap
    assert float((got.attributions - ref.attributions).norm() / ref.attributions.norm()) < 0.05
    torch.testing.assert_close(got.gap, ref.gap, rtol=0, atol=2e-2)
    gxi = gradient_x_input(half, inputs)
    assert gxi.dtype == torch.float32
    assert (torch.nn.functional.cosine_similarity(gxi, gradient_x_input(model, inputs), dim=1) > 0.95).all()
    occ = occlusion_by_role(half, inputs)
    for role, drop in occlusion_by_role(model, inputs).items():
        assert occ[role].dtype == torch.float32
        torch.testing.assert_close(occ[role], drop, rtol=0, atol=2e-2)


@needs_cuda
def test_cuda_model_attributes_like_the_cpu(setup):
    import copy

    model, tok, examples = setup
    inputs = role_inputs(tok, examples[:4])
    cuda = copy.deepcopy(model).to("cuda")
    ref, got = (integrated_gradients(m, inputs, steps=16, max_steps=16) for m in (model, cuda))
    assert got.attributions.device.type == "cpu"
    torch.testing.assert_close(got.attributions, ref.attributions, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got.gap, ref.gap, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gradient_x_input(cuda, inputs), gradient_x_input(model, inputs), rtol=1e-3, atol=1e-5)
    r = attribute(cuda, tok, examples[:4], steps=8, max_steps=32)
    assert r["n"] == 4 and 0 <= r["subject_plus_relation_share"] <= r["subject_relation_preceding_share"] <= 1


def test_refinement_is_per_example(setup):
    """An example that converged keeps its first satisfying step count; only the rest are recomputed, and each row
    equals a fixed-step run at the count it records."""
    model, tok, examples = setup
    inputs = role_inputs(tok, examples)
    r = integrated_gradients(model, inputs, steps=1, max_steps=128)
    assert r.converged and len(r.example_steps) == len(examples) and r.steps == max(r.example_steps)
    assert all(r.example_converged)
    assert len(set(r.example_steps)) > 1  # these prompts need different counts, so the refinement was exercised
    for k in set(r.example_steps):
        fixed = integrated_gradients(model, inputs, steps=k, max_steps=k)
        rows = torch.tensor(r.example_steps) == k
        torch.testing.assert_close(r.attributions[rows], fixed.attributions[rows], atol=1e-5, rtol=1e-4)
    coarse = integrated_gradients(model, inputs, steps=1, max_steps=1)  # no refinement allowed: flags who failed
    tol = 0.05 * coarse.gap.abs() + 1e-3
    assert coarse.example_converged == (coarse.delta.abs() <= tol).tolist()
    assert coarse.converged == all(coarse.example_converged)


def test_rows_of_a_forward_do_not_change_the_attributions(setup):
    """(step, example) rows flattened into forwards of any size, a chunk straddling two steps included, give the
    same integrated gradients as one row a forward."""
    model, tok, examples = setup
    inputs = role_inputs(tok, examples[:3])
    one = integrated_gradients(model, inputs, steps=8, max_steps=8, batch_size=1)
    for bs in (5, 64):
        other = integrated_gradients(model, inputs, steps=8, max_steps=8, batch_size=bs)
        assert torch.allclose(other.attributions, one.attributions, atol=1e-5)
        assert torch.allclose(other.delta, one.delta, atol=1e-5)
