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
    assert r["n"] == 6 and 0 <= r["subject_relation_share"] <= 1
    assert set(r["per_role"]) == set(ROLES) and sum(r["per_role"].values()) == pytest.approx(1, abs=1e-5)
