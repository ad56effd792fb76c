"""Attribution patching: zero for a self-patch, agreement statistics, and top-k re-checks by exact patching."""

import pytest
import torch

from mechrecall.patching import activation_patch, fact_pairs
from mechrecall.patching.atp import attribution_patch, check_attribution, validate_top_k


@pytest.fixture(scope="module")
def setup(micro_dataset, micro_tokenizer, micro_model):
    base, source, _ = fact_pairs(micro_dataset.factset(micro_dataset.pids("heldout")[:10]), micro_tokenizer, n=16)
    return micro_model, base, source


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "attn_out", "mlp_out"])
def test_self_patch_estimate_is_zero(setup, site):
    model, base, _ = setup
    est = attribution_patch(model, base, base, site=site)
    assert est.effect().abs().max() < 1e-5


def test_estimate_agrees_with_exact_patching_to_first_order(setup):
    model, base, source = setup
    est = attribution_patch(model, base, source, site="attn_out")
    exact = activation_patch(model, base, source, site="attn_out")
    assert est.values.shape == exact.values.shape and torch.equal(est.base, exact.base)
    check = check_attribution(est, exact)
    assert check["pearson_r"] > 0.3  # a screen, not an equality (random-init model: small, smooth effects)
    assert check_attribution(exact, exact)["relative_error_of_sum"] == 0


def test_validate_top_k_reports_exact_values(setup):
    model, base, source = setup
    est = attribution_patch(model, base, source, site="mlp_out")
    top = validate_top_k(model, base, source, est, k=3)
    exact = activation_patch(model, base, source, site="mlp_out").effect().mean(-1)
    assert len(top) == 3
    for cell in top:
        assert cell["exact"] == pytest.approx(float(exact[cell["layer"], base.pos_labels.index(cell["pos"])]), abs=1e-5)
