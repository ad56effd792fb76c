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
