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


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_param_groups_through_the_architecture_layer():
    from tests.tiny_models import ARCHS, tiny_model

    gpt2, neox, phi3 = tiny_model("gpt2"), tiny_model("gpt_neox"), tiny_model("phi3")
    assert param_group("transformer.h.1.attn.c_attn.weight", "layer_module", gpt2) == "layer.1/attn.c_attn"
    assert param_group("transformer.h.1.mlp.c_proj.bias", "module", gpt2) == "mlp.c_proj"
    assert param_group("transformer.h.0.ln_1.weight", "layer_module", gpt2) == "layer.0/norm"
    assert param_group("transformer.wpe.weight", "layer", gpt2) == "embed"
    assert param_group("transformer.ln_f.bias", "layer_module", gpt2) == "final_norm/norm"
    assert param_group("gpt_neox.layers.0.attention.query_key_value.weight", "module", neox) == "attn.query_key_value"
    assert param_group("gpt_neox.embed_in.weight", "module", neox) == "embed"
    assert param_group("lm_head.weight", "layer_module", neox) == "head/head"
    assert param_group("model.layers.1.mlp.gate_up_proj.weight", "module", phi3) == "mlp.gate_up_proj"
    vision = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert param_group(vision, "layer", tiny_model("gemma3")) == param_group(vision, "layer") == "other"
    for name in ARCHS:  # from the names alone, every family gets the groups its own model gives
        model = tiny_model(name)
        for n, _ in model.named_parameters():
            for by in ("layer", "module", "layer_module"):
                assert param_group(n, by) == param_group(n, by, model), (name, n, by)
    with pytest.raises(ValueError, match="grouping"):
        param_group("lm_head.weight", "head")


def test_param_groups_of_the_lab_model_are_the_llama_groups(micro_model):
    groups = {n: param_group(n, "layer_module", micro_model) for n, _ in micro_model.named_parameters()}
    assert groups["model.embed_tokens.weight"] == "embed/embed"
    assert groups["model.norm.weight"] == "final_norm/norm"
    assert groups["model.layers.0.self_attn.q_proj.weight"] == "layer.0/attn.q_proj"
    assert groups["model.layers.1.mlp.down_proj.weight"] == "layer.1/mlp.down_proj"
    assert groups["model.layers.1.input_layernorm.weight"] == "layer.1/norm"
    assert all(g == param_group(n, "layer_module") for n, g in groups.items())


def test_bfloat16_inputs_give_float32_cosines():
    torch.manual_seed(1)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    s = {n: torch.randn(6, 8, 4) for n in names}
    q = {n: v + 0.5 * torch.randn_like(v) for n, v in s.items()}
    ref = {r.group: r for r in gradient_consistency(s, q)}
    got = {r.group: r for r in gradient_consistency({n: v.bfloat16() for n, v in s.items()},
                                                    {n: v.bfloat16() for n, v in q.items()})}  # fmt: skip
    assert got.keys() == ref.keys()
    for g, r in got.items():
        assert r.same.dtype == torch.float32
        torch.testing.assert_close(r.same, ref[g].same, rtol=0, atol=2e-2)
    x = torch.randn(50, 8)
    assert linear_cka(x.bfloat16(), (2 * x).bfloat16()) == pytest.approx(1.0, abs=1e-2)


@needs_cuda
def test_cuda_tensors_give_cpu_results():
    torch.manual_seed(2)
    names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    s = {n: torch.randn(6, 8, 4) for n in names}
    q = {n: v + torch.randn_like(v) for n, v in s.items()}
    ref = gradient_consistency(s, q)
    got = gradient_consistency({n: v.cuda() for n, v in s.items()}, {n: v.cuda() for n, v in q.items()})
    for a, b in zip(got, ref):
        assert a.group == b.group and a.same.device.type == "cpu"
        torch.testing.assert_close(a.same, b.same, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.mismatched, b.mismatched, rtol=1e-4, atol=1e-5)
    x, y = torch.randn(40, 8), torch.randn(40, 8)
    assert linear_cka(x.cuda(), y.cuda()) == pytest.approx(linear_cka(x, y), abs=1e-4)
    c = cross_format_probe(x.cuda(), torch.arange(40).cuda() % 2, y.cuda(), torch.arange(40).cuda() % 2)
    assert 0 <= c["test_accuracy"] <= 1


def test_the_gradient_batch_follows_the_model_size_only(micro_model):
    """Per-example gradients of a batch of facts must fit the budget: 16 facts for the lab models (their numbers do
    not change), 2 where one fact's gradients of both formats alone exceed it, the count that fits in between."""
    from mechrecall.consistency import GRAD_BATCH_BYTES, grad_batch_for
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import build_model
    from mechrecall.lab.tokenizer import train_tokenizer

    model = micro_model
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert grad_batch_for(model) == 16 and 2 * 16 * size < GRAD_BATCH_BYTES
    assert grad_batch_for(model, budget=2 * size) == 2  # one fact fits: still a pair for the mismatched baseline
    assert grad_batch_for(model, budget=2 * size * 5 + 1) == 5
    preset = get_preset("default")
    default = build_model(preset.model, train_tokenizer(generate(preset.data.spec(), 0)), 0)
    assert grad_batch_for(default) == 16


# ------------------------------------------------------------------------------------ streamed, bounded memory
@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "gemma3_text", "phi3"])
def test_streamed_consistency_equals_the_vmap_path_with_three_gradients_at_most(name, monkeypatch):
    """The streamed path (one ordinary backward per gradient, at most three held) gives the vmap path's per-fact
    cosines, same-fact and mismatched, in every group; on models with transformers' default (sdpa) attention."""
    import weakref

    import mechrecall.gradients as gradients_mod
    from mechrecall.consistency import streamed_gradient_consistency
    from tests.test_architectures import VOCAB, _facts, _tokenizer
    from tests.tiny_models import tiny_model

    facts = _facts()
    tok = _tokenizer(facts)
    model = tiny_model(name, VOCAB)
    assert model.config._attn_implementation == "sdpa"
    storage, query = facts.examples("storage") * 2, facts.examples("query") * 2  # 8 facts: cycles longer than 2
    ref = streamed_gradient_consistency(model, tok, storage, query, batch_size=5, streamed=False)

    class Tracked(dict):
        pass

    alive, peak = [0], [0]
    real = gradients_mod.iter_example_grads

    def gone():
        alive[0] -= 1

    def tracked(*a, **k):
        for g in real(*a, **k):
            t = Tracked(g)
            weakref.finalize(t, gone)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            del g
            yield t

    monkeypatch.setattr(gradients_mod, "iter_example_grads", tracked)
    got = streamed_gradient_consistency(model, tok, storage, query, batch_size=5, streamed=True)
    assert peak[0] <= 3, peak
    assert [r.group for r in got] == [r.group for r in ref] and len(ref) > 3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.same, b.same, rtol=0, atol=2e-5, msg=a.group)
        torch.testing.assert_close(a.mismatched, b.mismatched, rtol=0, atol=2e-5, msg=a.group)
    assert model.config._attn_implementation == "sdpa"  # the user's setting is back
    assert all(p.grad is None for p in model.parameters())


def test_a_model_too_large_for_free_memory_is_refused_before_any_gradient(monkeypatch):
    import mechrecall.consistency as consistency_mod
    import mechrecall.devices as devices_mod
    import mechrecall.gradients as gradients_mod
    from mechrecall.devices import MemoryEstimateError
    from tests.test_architectures import VOCAB, _facts, _tokenizer
    from tests.tiny_models import tiny_model

    facts = _facts()
    model = tiny_model("llama", VOCAB)
    monkeypatch.setattr(devices_mod, "available_memory", lambda device: 1 << 29)  # 0.5 GiB free

    def no_gradients(*a, **k):
        raise AssertionError("a gradient was computed before the memory check")

    monkeypatch.setattr(gradients_mod, "iter_example_grads", no_gradients)
    monkeypatch.setattr(gradients_mod, "per_example_grads", no_gradients)
    with pytest.raises(MemoryEstimateError, match=r"gradient consistency .* needs about 1\.0 GiB on cpu and 0\.5 GiB"):
        consistency_mod.measure(model, _tokenizer(facts), facts, grad_facts=4, streamed=True)


def test_a_count_sketch_estimates_the_exact_cosines_holding_no_gradient_copy():
    """Sketched consistency (k = 4096 buckets per parameter tensor) against the exact streamed cosines: every per-fact
    cosine of every group within 0.1 (the estimate's error is of order 1 / sqrt(k) = 0.016), the same sketch for the
    same seed, and a gradient copy is never made (the sketch is taken from the parameters' own .grad)."""
    from mechrecall.consistency import streamed_gradient_consistency
    from mechrecall.gradients import CountSketch
    from tests.test_architectures import VOCAB, _facts, _tokenizer
    from tests.tiny_models import tiny_model

    facts = _facts()
    tok = _tokenizer(facts)
    model = tiny_model("llama", VOCAB)
    storage, query = facts.examples("storage") * 2, facts.examples("query") * 2
    exact = streamed_gradient_consistency(model, tok, storage, query, batch_size=4, streamed=True)
    sketched = streamed_gradient_consistency(model, tok, storage, query, batch_size=4, sketch_dim=4096)
    errors = []
    for a, b in zip(sketched, exact):
        assert a.group == b.group
        errors += [(a.same - b.same).abs().max(), (a.mismatched - b.mismatched).abs().max()]
    assert max(float(e) for e in errors) < 0.1, max(errors)
    names = [n for n, _ in model.named_parameters()]
    g = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    s1, s2 = CountSketch(names, 64, seed=3)(g), CountSketch(names, 64, seed=3)(g)
    assert torch.equal(s1, s2) and s1.shape == (len(names), 64)
    total = sum(float((v * v).sum()) for v in g.values())
    assert abs(float((s1.sum(0) ** 2).sum()) / total - 1) < 0.5  # the squared norm, unbiased (one draw, k = 64)
