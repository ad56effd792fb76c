"""Activation patching on every supported architecture (tiny random models built from Hugging Face configs): the
batched sweep (ragged fast path for Llama / Mistral / Qwen2 / Qwen3, the exact hooked path elsewhere) equals
whole-prompt hooked forwards patch by patch at every site, and the two paths agree where both apply."""

import pytest
import torch

from mechrecall import arch
from mechrecall.patching import GaussianNoise, PatchInputs, activation_patch
from mechrecall.patching.core import SITES
from tests.patch_reference import reference_patch
from tests.tiny_models import ARCHS, tiny_model


def _inputs(seed: int, lengths=(9, 7, 8, 9)) -> PatchInputs:
    """Right-padded random prompts of different lengths with three named positions per row (early, middle, last)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, 500, (len(lengths), T), generator=g)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    positions = torch.tensor([[1, n // 2, n - 1] for n in lengths])
    readout = torch.tensor([n - 1 for n in lengths])
    answer = torch.randint(3, 500, (len(lengths),), generator=g)
    foil = torch.randint(3, 500, (len(lengths),), generator=g)
    subj = [[1, 2] for _ in lengths]
    return PatchInputs(ids, positions, readout, answer, foil, ["early", "middle", "final"], subj)


def _with_answers(inputs: PatchInputs, lengths, seed: int) -> PatchInputs:
    """``inputs`` with whole answers of ``lengths`` tokens teacher-forced after each readout (padded with -1)."""
    g = torch.Generator().manual_seed(seed)
    K = max(lengths)
    ids = torch.cat([inputs.input_ids, torch.zeros(len(inputs), K, dtype=torch.long)], 1)
    answer_ids = torch.full((len(inputs), K), -1)
    for i, n in enumerate(lengths):
        a = torch.randint(3, 500, (n,), generator=g)
        answer_ids[i, :n] = a
        r = int(inputs.readout[i])
        ids[i, r + 1 : r + 1 + n] = a
        ids[i, r + 1 + n :] = 0
    return PatchInputs(ids, inputs.positions, inputs.readout, answer_ids[:, 0].clone(), inputs.foil,
                       inputs.pos_labels, inputs.subject_positions, answer_ids, answer_ids.clone())  # fmt: skip


def _sites(model):
    return [s for s in SITES if not (s == "resid_mid" and arch.resid_mid_module(model) is None)]


@pytest.fixture(scope="module")
def pair():
    base = _inputs(0)
    source = _inputs(1, lengths=(8, 9, 9, 7))
    return base, source


@pytest.mark.parametrize("name", ARCHS)
def test_sweep_equals_whole_prompt_hooked_forwards_at_every_site(name, pair):
    model = tiny_model(name, vocab_size=512)
    base, source = pair
    n_heads = arch.dims(model).n_heads
    for site in _sites(model):
        r = activation_patch(model, base, source, site=site, metric="logit_diff", max_rows=5, max_tokens=40)
        for L in range(arch.n_layers(model)):
            for j in range(base.positions.shape[1]):
                if site == "head":
                    for h in (0, n_heads - 1):
                        ref = reference_patch(model, base, source, site, L, j, h)
                        assert torch.allclose(r.values[L, h, j], ref, atol=2e-5), (name, site, L, h, j)
                else:
                    ref = reference_patch(model, base, source, site, L, j)
                    assert torch.allclose(r.values[L, j], ref, atol=2e-5), (name, site, L, j)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_ragged_and_hooked_paths_agree(name, pair):
    model = tiny_model(name, vocab_size=512)
    assert arch.fast_blocks(model, 16) is not None
    base, source = pair
    for site in SITES:
        a = activation_patch(model, base, source, site=site, path="ragged")
        b = activation_patch(model, base, source, site=site, path="hooked")
        assert torch.allclose(a.values, b.values, atol=2e-5), (name, site)


@pytest.mark.parametrize("name", ["gpt_neox", "gpt2", "gemma2", "olmo2", "phi3"])
def test_other_architectures_take_the_exact_path_and_refuse_the_ragged_one(name, pair):
    model = tiny_model(name, vocab_size=512)
    assert arch.fast_blocks(model, 16) is None
    with pytest.raises(ValueError, match="ragged path"):
        activation_patch(model, *pair, path="ragged")


@pytest.mark.parametrize("name", ["gpt_neox", "gemma2", "qwen3"])
def test_noise_corruption_and_clean_restore(name):
    """ROME tracing on any architecture: restoring the clean layer-0 input of every noised token undoes the noise."""
    model = tiny_model(name, vocab_size=512)
    clean = _inputs(2)
    clean.positions = torch.tensor([[1, 2, 1]] * len(clean))  # the noised (subject) tokens
    r = activation_patch(model, clean, clean, site="resid_pre", corruption=GaussianNoise(3.0, seed=1), metric="logprob")
    assert not torch.allclose(r.base, r.source, atol=1e-4)
    # restoring one of the two noised tokens is partial; check the exact identity on a single-token subject instead
    clean.subject_positions = [[1] for _ in range(len(clean))]
    r = activation_patch(model, clean, clean, site="resid_pre", corruption=GaussianNoise(3.0, seed=1), metric="logprob")
    assert torch.allclose(r.values[0, 0], r.source, atol=1e-4)


def test_bf16_model_patches_in_float32_metrics():
    model = tiny_model("llama", vocab_size=512)
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    base, source = _inputs(0), _inputs(1, lengths=(8, 9, 9, 7))
    full = activation_patch(model, base, source, site="resid_pre")
    low = activation_patch(half, base, source, site="resid_pre")
    assert low.values.dtype == torch.float32 and low.values.device.type == "cpu"
    assert (low.values - full.values).abs().max() < 0.1 * full.values.abs().max() + 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_cuda_equals_cpu(name, pair):
    import copy

    model = tiny_model(name, vocab_size=512)
    gpu = copy.deepcopy(model).cuda()
    for site in ("resid_pre", "head"):
        a = activation_patch(model, *pair, site=site)
        b = activation_patch(gpu, *pair, site=site)
        assert b.values.device.type == "cpu" and torch.allclose(a.values, b.values, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt_neox", "gemma2"])
def test_whole_answer_metric_equals_teacher_forced_reference(name, pair):
    """``answer_logprob`` sums every answer token's log-probability after the patch, on both paths."""
    model = tiny_model(name, vocab_size=512)
    base = _with_answers(pair[0], (3, 1, 2, 3), seed=5)
    source = _with_answers(pair[1], (2, 2, 1, 3), seed=6)
    paths = ("ragged", "hooked") if arch.fast_blocks(model, 16) is not None else ("hooked",)
    for path in paths:
        for site in ("resid_pre", "mlp_out", "head"):
            r = activation_patch(model, base, source, site=site, metric=["answer_logprob", "logit_diff"], path=path,
                                 max_rows=7)  # fmt: skip
            first = activation_patch(model, base, source, site=site, metric="logit_diff", path=path)
            assert torch.allclose(r["logit_diff"].values, first.values, atol=2e-5)  # first-token metrics do not move
            for L in range(arch.n_layers(model)):
                for j in range(base.positions.shape[1]):
                    if site == "head":
                        ref = reference_patch(model, base, source, site, L, j, 1, metric="answer_logprob")
                        got = r["answer_logprob"].values[L, 1, j]
                    else:
                        ref = reference_patch(model, base, source, site, L, j, metric="answer_logprob")
                        got = r["answer_logprob"].values[L, j]
                    assert torch.allclose(got, ref, atol=5e-5), (name, path, site, L, j)


def test_whole_answer_metric_needs_whole_answer_inputs(pair):
    model = tiny_model("llama", vocab_size=512)
    with pytest.raises(ValueError, match="whole_answer=True"):
        activation_patch(model, *pair, metric="answer_logprob")


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_whole_answer_rows_with_a_long_prompt_and_a_short_answer(name, pair):
    """Inputs only as wide as their longest prompt + answer (the longest answer after a short prompt): every row
    still reads its own answer, on the ragged path too."""
    model = tiny_model(name, vocab_size=512)
    base = _with_answers(pair[0], (1, 3, 2, 1), seed=7)  # readouts 8, 6, 7, 8
    width = int((base.readout + 1 + (base.answer_ids >= 0).sum(1)).max())
    base.input_ids = base.input_ids[:, :width]
    assert width < int(base.readout.max()) + base.answer_ids.shape[1]
    source = _with_answers(pair[1], (2, 2, 1, 3), seed=8)
    r = activation_patch(model, base, source, site="resid_pre", metric="answer_logprob")
    for L in range(arch.n_layers(model)):
        for j in range(base.positions.shape[1]):
            ref = reference_patch(model, base, source, "resid_pre", L, j, metric="answer_logprob")
            assert torch.allclose(r.values[L, j], ref, atol=5e-5), (name, L, j)
