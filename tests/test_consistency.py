import pytest
import torch

from mechrecall.consistency import (
    bootstrap_ci,
    cosine_consistency,
    cross_format_probe,
    derangement,
    gradient_consistency,
    linear_cka,
    param_group,
)


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 10, 101):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and not (p == torch.arange(n)).any()
    with pytest.raises(ValueError):
        derangement(1)


def test_cosine_consistency_same_vs_mismatched():
    torch.manual_seed(0)
    a = torch.randn(50, 16)
    c = cosine_consistency("x", a, a + 0.01 * torch.randn(50, 16))
    s = c.summary(n_boot=200)
    assert s["mean_cos"] > 0.99 and abs(s["baseline_mean_cos"]) < 0.2 and s["ci"][0] <= s["mean_cos"] <= s["ci"][1]


def test_gradient_consistency_groups_by_layer_and_module():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    torch.manual_seed(0)
    s = {n: torch.randn(8, 3, 4) for n in names}
    q = {n: v.clone() for n, v in s.items()}
    q["model.layers.1.mlp.up_proj.weight"] = -q["model.layers.1.mlp.up_proj.weight"]  # anti-aligned group
    res = {r.group: r for r in gradient_consistency(s, q)}
    assert {
        "all",
        "layer:embed",
        "layer:layer.0",
        "layer:layer.1",
        "layer:final_norm",
        "module:attn.q_proj",
        "module:mlp.up_proj",
    } <= res.keys()
    assert torch.allclose(res["layer:layer.0"].same, torch.ones(8))
    assert torch.allclose(res["layer:layer.1"].same, -torch.ones(8))
    # hand computation for "all": cosine of the concatenated flattened vectors
    fs = torch.cat([s[n].flatten(1) for n in names], 1)
    fq = torch.cat([q[n].flatten(1) for n in names], 1)
    torch.testing.assert_close(res["all"].same, torch.nn.functional.cosine_similarity(fs, fq))


def test_param_group_names():
    assert param_group("model.layers.12.self_attn.o_proj.weight", "layer_module") == "layer.12/attn.o_proj"
    assert param_group("model.layers.3.post_attention_layernorm.weight", "module") == "norm"


def test_linear_cka_properties():
    torch.manual_seed(0)
    x = torch.randn(100, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x, x @ q * 3.0) == pytest.approx(1.0, abs=1e-5)  # invariant to rotation and scale
    assert linear_cka(x, torch.randn(100, 8)) < 0.3


def test_bootstrap_ci_covers_mean():
    v = torch.arange(100.0)
    lo, hi = bootstrap_ci(v, 500)
    assert lo < 49.5 < hi


def test_cross_format_probe_transfers_when_formats_share_a_direction():
    torch.manual_seed(0)
    centers = torch.randn(5, 20) * 3
    y = torch.randint(0, 5, (200,))
    storage = centers[y] + torch.randn(200, 20)
    query_shared = centers[y] + torch.randn(200, 20) + 0.5  # same code, shifted
    query_other = torch.randn(5, 20)[y] * 3 + torch.randn(200, 20)  # unrelated code
    good = cross_format_probe(storage[:100], y[:100], query_shared[100:], y[100:])
    bad = cross_format_probe(storage[:100], y[:100], query_other[100:], y[100:])
    assert good["test_accuracy"] > 0.8 and bad["test_accuracy"] < 0.5
