import copy

import pytest
import torch

from mechrecall.gradients import (
    Projection,
    answer_batch,
    flatten,
    gradient_stats,
    per_example_grads,
    per_example_grads_loop,
    select_params,
)
from mechrecall.lab.config import get_preset
from mechrecall.lab.models import build_model
from mechrecall.loading import LoadedModel, hf_name, to_nnsight, to_transformer_lens


@pytest.fixture(scope="module")
def setup(micro_dataset, micro_tokenizer):
    model = build_model(get_preset("micro").model, micro_tokenizer, seed=2)
    pids = micro_dataset.pids("heldout")[:3]
    return model, micro_dataset.storage_examples(pids), micro_dataset.query_examples(pids)


@pytest.mark.parametrize("fmt", ["storage", "query"])
def test_vmap_per_example_grads_equal_a_loop(setup, micro_tokenizer, fmt):
    model, storage, query = setup
    batch = answer_batch(micro_tokenizer, (storage if fmt == "storage" else query)[:6])
    fast, slow = per_example_grads(model, batch), per_example_grads_loop(model, batch)
    assert fast.keys() == slow.keys() and "model.embed_tokens.weight" in fast
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-6)


def test_subset_of_parameters(setup, micro_tokenizer):
    model, storage, _ = setup
    params = select_params(model, lambda n: ".layers.1." in n)
    g = per_example_grads(model, answer_batch(micro_tokenizer, storage[:3]), params)
    assert set(g) == set(params) and all(v.shape[0] == 3 for v in g.values())


def test_backend_gradients_match_hugging_face(setup, micro_tokenizer):
    """Parameter gradients through TransformerLens (raw mode) and nnsight equal the plain HF ones, by HF name."""
    import torch.nn.functional as F

    model, _, query = setup
    batch = answer_batch(micro_tokenizer, query[:4])
    loaded = LoadedModel(model, micro_tokenizer, "t", "t")

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100)

    model.zero_grad()
    loss_of(model(input_ids=batch.input_ids).logits).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    bridge = to_transformer_lens(loaded)
    loss_of(bridge(batch.input_ids, return_type="logits")).backward()
    tl = {hf_name(n): p.grad for n, p in bridge.named_parameters()}
    nn = to_nnsight(loaded)
    with nn.trace(batch.input_ids):
        logits = nn.lm_head.output
        loss = loss_of(logits)
        loss.backward()
    nns = {n: p.grad for n, p in nn._module.named_parameters()}
    for name, g in ref.items():
        torch.testing.assert_close(tl[name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(nns[name], g, rtol=1e-4, atol=1e-6)


def test_gradient_stats_stream_and_aggregate(setup, micro_tokenizer, tmp_path):
    from safetensors.torch import load_file

    model, storage, _ = setup
    stats = gradient_stats(model, micro_tokenizer, storage[:10], batch_size=4, keep_per_example=True)
    full = per_example_grads(model, answer_batch(micro_tokenizer, storage[:10]))
    for k in full:
        torch.testing.assert_close(stats.mean[k], full[k].mean(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.mean_abs[k], full[k].abs().mean(0), rtol=1e-4, atol=1e-7)
    assert stats.per_example.shape == (10, flatten(full).shape[1])
    saved = load_file(stats.save(tmp_path / "g.safetensors"))
    assert torch.equal(saved["mean.model.embed_tokens.weight"], stats.mean["model.embed_tokens.weight"])


def test_projection_is_fixed_and_preserves_cosines_roughly():
    x = torch.randn(6, 5000)
    p = Projection(5000, 2048, seed=3)
    a, b = p(x), p(x)
    assert torch.equal(a, b)
    cos_full = torch.nn.functional.cosine_similarity(x[0:1] + x[1:2], x[1:2])
    cos_proj = torch.nn.functional.cosine_similarity(p(x[0:1] + x[1:2]), p(x[1:2]))
    assert abs(float(cos_full - cos_proj)) < 0.1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cosines(a: dict, b: dict) -> torch.Tensor:
    """Per-example cosine of two per-example gradient sets (flattened, float32)."""
    return torch.nn.functional.cosine_similarity(flatten(a).float().cpu(), flatten(b).float().cpu(), dim=1)


def test_bfloat16_model_grads_in_its_dtype_aggregates_in_float32(setup, micro_tokenizer):
    model, storage, _ = setup
    half = copy.deepcopy(model).to(torch.bfloat16)
    batch = answer_batch(micro_tokenizer, storage[:4])
    ref, got = per_example_grads(model, batch), per_example_grads(half, batch)
    assert all(g.dtype == torch.bfloat16 for g in got.values())
    assert (_cosines(got, ref) > 0.98).all()
    stats = gradient_stats(half, micro_tokenizer, storage[:4], batch_size=2, keep_per_example=True, project_dim=32)
    exact = gradient_stats(model, micro_tokenizer, storage[:4], batch_size=2, keep_per_example=True, project_dim=32)
    for k in ref:
        assert stats.mean[k].dtype == stats.mean_abs[k].dtype == torch.float32 and stats.mean[k].device.type == "cpu"
    assert stats.per_example.dtype == torch.float32 and stats.per_example.shape == (4, 32)
    flat_half = torch.cat([v.flatten() for v in stats.mean_abs.values()])
    flat_ref = torch.cat([v.flatten() for v in exact.mean_abs.values()])
    assert float(torch.nn.functional.cosine_similarity(flat_half, flat_ref, dim=0)) > 0.99
    assert (torch.nn.functional.cosine_similarity(stats.per_example, exact.per_example, dim=1) > 0.98).all()


@needs_cuda
def test_cuda_grads_match_the_cpu(setup, micro_tokenizer):
    model, storage, _ = setup
    cuda = copy.deepcopy(model).to("cuda")
    batch = answer_batch(micro_tokenizer, storage[:4])  # on the CPU: moved to the model's device
    ref, got = per_example_grads(model, batch), per_example_grads(cuda, batch)
    loop = per_example_grads_loop(cuda, batch)
    for k in ref:
        assert got[k].device.type == "cuda"
        torch.testing.assert_close(got[k].cpu(), ref[k], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(loop[k].cpu(), ref[k], rtol=1e-3, atol=1e-5)
    stats = gradient_stats(cuda, micro_tokenizer, storage[:6], batch_size=4, keep_per_example=True, project_dim=16)
    exact = gradient_stats(model, micro_tokenizer, storage[:6], batch_size=4, keep_per_example=True, project_dim=16)
    for k in exact.mean:
        assert stats.mean[k].device.type == "cpu"
        torch.testing.assert_close(stats.mean[k], exact.mean[k], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(stats.per_example, exact.per_example, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["opt", "bloom"])
def test_architectures_the_layer_does_not_know_get_gradients_or_one_clear_refusal(name):
    """OPT and Bloom (no row in mechrecall.arch), built with transformers' defaults: per-example gradients work
    (Bloom's custom GELU defeats vmap: the loop path answers, with the same numbers), and an analysis that needs the
    architecture layer refuses in one line naming the model type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechrecall.arch import UnsupportedArchitecture
    from mechrecall.cache import cache_residuals
    from mechrecall.gradients import answer_batch, per_example_grads, per_example_grads_loop
    from tests.test_architectures import _facts, _tokenizer

    sizes = {
        "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64),
        "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    }[name]
    cfg = AutoConfig.for_model(name, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    facts = _facts()
    tok = _tokenizer(facts)
    batch = answer_batch(tok, facts.examples("query")[:2])
    fast, slow = per_example_grads(model, batch), per_example_grads_loop(model, batch)
    assert fast.keys() == slow.keys()
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=0, atol=1e-5, msg=n)
    with pytest.raises(UnsupportedArchitecture, match=f"model_type '{name}'"):
        cache_residuals(model, tok, facts.examples("storage"))


def test_post_hoc_importance_too_large_for_free_memory_is_refused_before_any_gradient(monkeypatch):
    """The mask importance's estimate (gradient buffers, one gradient, the float32 sums, 1 GiB) is checked against
    free memory first: one line saying what it needs, no gradient computed."""
    import mechrecall.devices as devices_mod
    import mechrecall.gradients as gradients_mod
    from mechrecall.devices import MemoryEstimateError
    from mechrecall.masks import posthoc_importance
    from tests.test_architectures import VOCAB, _facts, _tokenizer
    from tests.tiny_models import tiny_model

    facts = _facts()
    model = tiny_model("llama", VOCAB)
    examples = facts.examples("storage", templates=[0])[:4]
    device, cpu = gradients_mod.stats_memory(gradients_mod.select_params(model), 4, streamed=True, batch_size=2)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cpu == 8 * n and device == 2 * 4 * n + (1 << 30)  # float32 model: buffers + one gradient, and 1 GiB
    monkeypatch.setattr(devices_mod, "available_memory", lambda device: 1 << 29)  # 0.5 GiB free

    def no_gradients(*a, **k):
        raise AssertionError("a gradient was computed before the memory check")

    monkeypatch.setattr(gradients_mod, "iter_example_grads", no_gradients)
    monkeypatch.setattr(gradients_mod, "per_example_grads", no_gradients)
    with pytest.raises(
        MemoryEstimateError, match=r"per-example gradients \(.*\) of [\d,]+ parameters needs about 1\.0"
    ):
        posthoc_importance(model, _tokenizer(facts), examples, batch_size=2)
    monkeypatch.undo()
    assert set(posthoc_importance(model, _tokenizer(facts), examples, batch_size=2)) == set(
        gradients_mod.select_params(model)
    )
