import copy

import pytest
import torch

from mechrecall.cache import ResidualCache, cache_residuals
from mechrecall.lab.config import get_preset
from mechrecall.lab.models import build_model
from mechrecall.loading import LoadedModel, to_nnsight, to_transformer_lens
from mechrecall.tokenization import encode_example


@pytest.fixture(scope="module")
def model_and_examples(micro_dataset, micro_tokenizer):
    model = build_model(get_preset("micro").model, micro_tokenizer, seed=1)
    pids = micro_dataset.pids("heldout")[:6]
    return model, micro_dataset.storage_examples(pids), micro_dataset.query_examples(pids)


@pytest.mark.parametrize("fmt", ["storage", "query"])
def test_backends_give_the_same_residuals(model_and_examples, micro_tokenizer, fmt):
    model, storage, query = model_and_examples
    examples = storage if fmt == "storage" else query
    loaded = LoadedModel(model, micro_tokenizer, "test", "test")
    ref = cache_residuals(model, micro_tokenizer, examples, batch_size=8)
    tl = cache_residuals(to_transformer_lens(loaded), micro_tokenizer, examples, backend="tl", batch_size=8)
    nn = cache_residuals(to_nnsight(loaded), micro_tokenizer, examples, backend="nnsight", batch_size=8)
    for site in ("resid_pre", "resid_mid", "resid_post"):
        torch.testing.assert_close(tl.data[site], ref.data[site], rtol=0, atol=1e-5)
        torch.testing.assert_close(nn.data[site], ref.data[site], rtol=0, atol=1e-5)
    # resid_post of layer L is resid_pre of layer L+1
    torch.testing.assert_close(ref["resid_post", 0], ref["resid_pre", 1])


def test_states_match_an_unbatched_forward(model_and_examples, micro_tokenizer):
    """Padding and batching do not change a fact's states: compare with HF hidden_states of a single prompt."""
    from mechrecall.tokenization import encode_example

    model, storage, _ = model_and_examples
    cache = cache_residuals(model, micro_tokenizer, storage, batch_size=5)
    for i in (0, 7, len(storage) - 1):
        enc = encode_example(micro_tokenizer, storage[i], add_eos=False)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states
        for j, role in enumerate(cache.roles):
            torch.testing.assert_close(cache["resid_pre", 1][i, j], hs[1][0, enc.last(role)], rtol=0, atol=1e-5)


def test_streamed_cache_round_trips_exactly(tmp_path, model_and_examples, micro_tokenizer):
    model, storage, _ = model_and_examples
    mem = cache_residuals(model, micro_tokenizer, storage, batch_size=4)
    folder = cache_residuals(
        model, micro_tokenizer, storage, tmp_path / "c", batch_size=4, shard_size=8, meta={"checkpoint": "x"}
    )
    disk = ResidualCache.load(folder)
    assert len(disk.meta["shards"]) == -(-len(storage) // 8)
    assert disk.meta["checkpoint"] == "x" and len(disk.meta["fact_ids"]) == len(storage)
    for site in mem.data:
        assert torch.equal(mem.data[site], disk.data[site])
    assert disk["resid_post", -1, "final"].shape == (len(storage), model.config.hidden_size)


def test_streaming_holds_at_most_one_shard(monkeypatch, tmp_path, micro_dataset, micro_tokenizer):
    """Memory stays flat: pending states never exceed one shard (+ one batch) whatever the number of facts."""
    import mechrecall.cache as cache_mod

    model = build_model(get_preset("micro").model, micro_tokenizer, seed=1)
    examples = micro_dataset.storage_examples() * 2  # 2,400 facts
    sizes = []
    real_save = cache_mod.save_file

    def spy(block, path, *a, **k):
        sizes.append(next(iter(block.values())).shape[1])
        return real_save(block, path, *a, **k)

    monkeypatch.setattr(cache_mod, "save_file", spy)
    cache_residuals(
        model, micro_tokenizer, examples, tmp_path / "big", batch_size=50, shard_size=200, sites=("resid_post",)
    )
    assert sum(sizes) == len(examples) and max(sizes) <= 200 + 50 and len(sizes) >= 10


def test_unknown_backend(model_and_examples, micro_tokenizer):
    model, storage, _ = model_and_examples
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        cache_residuals(model, micro_tokenizer, storage, backend="jax")


def test_all_positions_option(model_and_examples, micro_tokenizer):
    model, storage, _ = model_and_examples
    roles = cache_residuals(model, micro_tokenizer, storage[:9], batch_size=4)
    full = cache_residuals(model, micro_tokenizer, storage[:9], batch_size=4, all_positions=True)
    lengths = full.meta["prompt_lengths"]
    assert len(full.roles) == max(lengths)
    for i in range(9):
        for j, role in enumerate(roles.roles):
            p = full.meta["role_positions"][i][role]
            torch.testing.assert_close(full["resid_mid", 1][i, p], roles["resid_mid", 1][i, j])
        assert not full["resid_mid", 1][i, lengths[i] :].any()  # zero padding past the prompt


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_public_backend_functions_return_float32_on_the_cpu(model_and_examples, micro_tokenizer):
    from mechrecall.cache import SITES, default_sites, residuals_hf
    from mechrecall.tokenization import collate_examples

    model, storage, _ = model_and_examples
    batch = collate_examples([encode_example(micro_tokenizer, e, add_eos=False) for e in storage[:4]], 0)
    states = residuals_hf(model, batch.input_ids, batch.attention_mask)
    assert tuple(states) == default_sites(model) == SITES
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in states.values())
    with pytest.raises(ValueError, match="unknown residual site 'attn_out'"):
        residuals_hf(model, batch.input_ids, batch.attention_mask, ("attn_out",))


def test_bfloat16_model_caches_float32_close_to_float32(model_and_examples, micro_tokenizer):
    model, storage, _ = model_and_examples
    ref = cache_residuals(model, micro_tokenizer, storage[:8], batch_size=4)
    half = copy.deepcopy(model).to(torch.bfloat16)
    got = cache_residuals(half, micro_tokenizer, storage[:8], batch_size=4)
    for site, states in ref.data.items():
        assert got.data[site].dtype == torch.float32 and got.data[site].device.type == "cpu"
        assert float((got.data[site] - states).norm() / states.norm()) < 0.05, site


@needs_cuda
def test_cuda_model_caches_like_the_cpu(model_and_examples, micro_tokenizer):
    from mechrecall.loading import LoadedModel, to_nnsight

    model, storage, _ = model_and_examples
    ref = cache_residuals(model, micro_tokenizer, storage[:8], batch_size=4)
    cuda = copy.deepcopy(model).to("cuda")
    got = cache_residuals(cuda, micro_tokenizer, storage[:8], batch_size=4)
    full = cache_residuals(cuda, micro_tokenizer, storage[:8], batch_size=4, all_positions=True)
    nns = cache_residuals(
        to_nnsight(LoadedModel(cuda, micro_tokenizer, "t", "t"), check=False), micro_tokenizer, storage[:8],
        backend="nnsight", batch_size=4,
    )  # fmt: skip
    for site, states in ref.data.items():
        assert got.data[site].device.type == "cpu" and full.data[site].device.type == "cpu"
        torch.testing.assert_close(got.data[site], states, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(nns.data[site], states, rtol=1e-4, atol=1e-4)
