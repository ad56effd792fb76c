"""Activation patching: identities, parity with TransformerLens's get_act_patch_resid_pre and across backends,
batching, corruption, role alignment on every template."""

import pytest
import torch

from mechrecall.lab.bios import ATTRIBUTES
from mechrecall.patching import (
    GaussianNoise,
    PatchInputs,
    activation_patch,
    fact_inputs,
    fact_pairs,
    full_patch_logits,
    set_head,
)
from mechrecall.patching.core import SITES, capture
from tests.patch_reference import reference_patch


@pytest.fixture(scope="module")
def lab(micro_dataset, micro_tokenizer, micro_model):
    """A randomly initialised micro model and its data."""
    return micro_model, micro_tokenizer, micro_dataset


@pytest.fixture(scope="module")
def pairs(lab):
    model, tok, ds = lab
    return fact_pairs(ds.factset(ds.pids("heldout")[:12]), tok, n=24)


@pytest.mark.parametrize("site", SITES)
def test_patching_a_run_with_its_own_activations_changes_nothing(lab, pairs, site):
    model = lab[0]
    base, _, _ = pairs
    r = activation_patch(model, base, base, site=site, skip_identical=False)  # run every patch, no shortcut
    assert torch.allclose(r.values, r.base.expand_as(r.values), atol=1e-5)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_patching_the_full_source_run_reproduces_the_source_output(lab, site):
    model, tok, ds = lab
    pids = ds.pids("heldout")[:8]
    qa = [ds.query_examples([p], templates=[0])[1] for p in pids]  # same attribute: same length
    base = fact_inputs(tok, qa)
    source = fact_inputs(tok, [ds.query_examples([p], templates=[0])[1] for p in reversed(pids)])
    _, _, src_logits = capture(model, source.input_ids, site)
    patched = full_patch_logits(model, base, source, site)
    assert torch.allclose(patched, src_logits[torch.arange(len(base)), base.readout], atol=1e-5)


def test_resid_pre_layer0_at_single_token_subject_moves_the_whole_fact(lab, pairs):
    """With one token per name, the subject's layer-0 residual is the name embedding: swapping it equals running the
    base prompt with the source person's name, so the value must equal that run's metric."""
    model, tok, ds = lab
    base, source, rows = pairs
    r = activation_patch(model, base, source, site="resid_pre", layers=[0], metric="logit_diff")
    ids = base.input_ids.clone()
    b = torch.arange(len(base))
    ids[b, base.positions[:, 0]] = source.input_ids[b, source.positions[:, 0]]
    logits = model(input_ids=ids).logits[b, base.readout]
    expected = logits.gather(1, base.answer[:, None])[:, 0] - logits.gather(1, base.foil[:, None])[:, 0]
    assert torch.allclose(r.values[0, 0], expected, atol=1e-4)


def test_batched_sweep_equals_transformer_lens_get_act_patch_resid_pre(lab):
    from transformer_lens.patching import get_act_patch_resid_pre

    from mechrecall.loading import LoadedModel, to_transformer_lens

    model, tok, ds = lab
    pids = ds.pids("heldout")[:6]
    attr = 2
    base = fact_inputs(tok, [ds.query_examples([p], templates=[0])[attr] for p in pids]).all_positions()
    src_ex = [ds.query_examples([p], templates=[0])[attr] for p in pids[1:] + pids[:1]]
    source = fact_inputs(tok, src_ex).all_positions()
    base.answer = source.answer.clone()
    ours = activation_patch(model, base, source, site="resid_pre", metric="logit_diff", max_rows=7)
    bridge = to_transformer_lens(LoadedModel(model, tok, "micro", "micro"))
    _, clean_cache = bridge.run_with_cache(source.input_ids)
    b = torch.arange(len(base))

    def metric(logits):
        last = logits[b, base.readout]
        return last.gather(1, base.answer[:, None])[:, 0] - last.gather(1, base.foil[:, None])[:, 0]

    with torch.no_grad():
        theirs = get_act_patch_resid_pre(bridge, base.input_ids, clean_cache, metric, reduce="none")
    theirs = theirs.values if hasattr(theirs, "values") and not isinstance(theirs, torch.Tensor) else theirs
    assert theirs.shape == ours.values.shape  # [layer, pos, batch]
    assert torch.allclose(ours.values, theirs, atol=1e-5)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_backends_agree(lab, pairs, site):
    from mechrecall.loading import LoadedModel, to_nnsight, to_transformer_lens

    model, tok, _ = lab
    base, source, _ = pairs
    loaded = LoadedModel(model, tok, "micro", "micro")
    hf = activation_patch(model, base, source, site=site)
    tl = activation_patch(to_transformer_lens(loaded), base, source, site=site, backend="transformer_lens")
    nn = activation_patch(to_nnsight(loaded), base, source, site=site, backend="nnsight")
    assert torch.allclose(hf.values, tl.values, atol=1e-5)
    assert torch.allclose(hf.values, nn.values, atol=1e-5)
    assert torch.allclose(hf.source, nn.source, atol=1e-5)


def _reference_patch(model, base, source, site, L, j, head=None):
    """One patch by a plain hooked HF forward of the whole prompt (no shortcut): the metric per example."""
    return reference_patch(model, base, source, site, L, j, head)


@pytest.mark.parametrize("site", SITES)
def test_ragged_sweep_equals_plain_hooked_forwards_one_patch_at_a_time(lab, pairs, site):
    """The ragged forward (suffix tokens only, cached prefix keys/values, readout-only last layer) against whole-prompt
    hooked HF forwards, for every layer and role; the pairs' role positions and lengths differ by row."""
    model = lab[0]
    base, source, _ = pairs
    r = activation_patch(model, base, source, site=site, metric="logit_diff", max_rows=17, max_tokens=64)
    n_layers = model.config.num_hidden_layers
    for L in range(n_layers):
        for j in range(base.positions.shape[1]):
            if site == "head":
                for hd in (0, model.config.num_attention_heads - 1):
                    ref = _reference_patch(model, base, source, site, L, j, hd)
                    assert torch.allclose(r.values[L, hd, j], ref, atol=1e-5), (L, hd, j)
            else:
                ref = _reference_patch(model, base, source, site, L, j)
                assert torch.allclose(r.values[L, j], ref, atol=1e-5), (L, j)


@pytest.mark.parametrize("site", SITES)
def test_skipping_identical_patches_gives_the_same_values(lab, site):
    """Clean and corrupted prompts that share a prefix: patches there are bitwise no-ops and skipped."""
    model, tok, ds = lab
    pids = ds.pids("heldout")[:6]
    ex = [ds.query_examples([p], templates=[0])[3] for p in pids]
    base = fact_inputs(tok, ex).all_positions()
    source = fact_inputs(tok, ex[1:] + ex[:1]).all_positions()
    ran = activation_patch(model, base, source, site=site, skip_identical=False)
    skipped = activation_patch(model, base, source, site=site, max_rows=40)
    assert torch.allclose(ran.values, skipped.values, atol=1e-5)
    # the shared question prefix ("What is the ... of") really is skipped: its values are the base value exactly
    shared = int((base.input_ids == source.input_ids).all(0).long().argmin())
    assert shared > 0
    v = skipped.values[..., :shared, :]
    assert torch.equal(v, skipped.base.expand_as(v))


@pytest.mark.parametrize("site", ["resid_mid", "head"])
def test_batching_matches_one_example_at_a_time(lab, pairs, site):
    model = lab[0]
    base, source, _ = pairs
    full = activation_patch(model, base, source, site=site, max_rows=5)
    for i in (0, 7):
        one = lambda x, i=i: PatchInputs(  # noqa: E731
            x.input_ids[i : i + 1], x.positions[i : i + 1], x.readout[i : i + 1], x.answer[i : i + 1],
            x.foil[i : i + 1], x.pos_labels, x.subject_positions[i : i + 1],
        )  # fmt: skip
        single = activation_patch(model, one(base), one(source), site=site)
        assert torch.allclose(full.values[..., i], single.values[..., 0], atol=1e-5)


def test_set_head_writes_one_head_slice():
    act = torch.zeros(3, 8)  # 3 packed tokens, 4 heads of width 2
    out = set_head(act, torch.tensor([2]), torch.tensor([[5.0, 6.0]]), torch.tensor([3]))
    assert out[2].tolist() == [0, 0, 0, 0, 0, 0, 5, 6] and out.sum() == 11 and act.sum() == 0


def test_noise_corruption_and_clean_restore_at_the_subject(lab):
    """ROME tracing: noise on the (single) subject token; restoring its clean layer-0 input undoes the corruption."""
    model, tok, ds = lab
    ex = ds.query_examples(ds.pids("heldout")[:10], templates=[0])[:10]
    clean = fact_inputs(tok, ex)
    r = activation_patch(model, clean, clean, site="resid_pre", corruption=GaussianNoise(3.0, seed=1), metric="logprob")
    assert not torch.allclose(r.base, r.source, atol=1e-3)  # the noise changed the prediction
    assert torch.allclose(r.values[0, 0], r.source, atol=1e-4)  # layer 0, subject: fully restored
    df = r.to_dataframe()
    assert len(df) == r.values.numel() and set(df.columns) >= {"layer", "pos", "example", "value", "effect"}


@pytest.mark.parametrize("fmt", ["storage", "query"])
def test_role_positions_land_on_role_tokens_for_every_template(micro_dataset, micro_tokenizer, fmt):
    from mechrecall.lab.bios import query_example

    ds, tok = micro_dataset, micro_tokenizer
    p = ds.pids("heldout")[0]
    if fmt == "storage":
        examples = [ds.bios[p][0].facts[a] for a in ATTRIBUTES]
        examples += [ds.bios[q][0].facts[a] for q in ds.pids("train")[:20] for a in ATTRIBUTES]
    else:
        from mechrecall.lab.bios import QUERY_TEMPLATES

        examples = [query_example(ds.people[p], a, t) for a in ATTRIBUTES for t in range(len(QUERY_TEMPLATES[a]))]
    inputs = fact_inputs(tok, examples)
    for i, ex in enumerate(examples):
        enc = tok(ex.text, return_offsets_mapping=True)
        for j, role in enumerate(inputs.pos_labels):
            pos = int(inputs.positions[i, j])
            start, end = enc["offset_mapping"][pos]
            if role == "final":
                assert end <= ex.spans["answer"][0][0] and pos == int(inputs.readout[i])
            else:
                assert any(s <= start and end <= e for s, e in ex.spans[role]), (role, ex.text)
        assert int(inputs.answer[i]) == enc["input_ids"][int(inputs.readout[i]) + 1]


def test_bad_site_metric_and_unpaired_inputs(lab, pairs):
    model = lab[0]
    base, source, _ = pairs
    with pytest.raises(ValueError, match="site"):
        activation_patch(model, base, source, site="resid_final")
    with pytest.raises(ValueError, match="metric"):
        activation_patch(model, base, source, metric="accuracy")
    with pytest.raises(ValueError, match="rows"):
        activation_patch(model, base, fact_inputs(lab[1], lab[2].query_examples([0])[:2]))


def test_several_metrics_from_the_same_forwards_equal_separate_sweeps(lab, pairs):
    model = lab[0]
    base, source, _ = pairs
    both = activation_patch(model, base, source, site="mlp_out", metric=["logit_diff", "hit"])
    for name in ("logit_diff", "hit"):
        one = activation_patch(model, base, source, site="mlp_out", metric=name)
        assert both[name].metric == name and torch.equal(both[name].values, one.values)
        assert torch.equal(both[name].base, one.base)


def test_whole_answer_pairs_teacher_force_the_source_facts_answer(lab):
    model, tok, ds = lab
    facts = ds.factset(ds.pids("heldout")[:12])
    first, _, _ = fact_pairs(facts, tok, n=24)
    base, source, rows = fact_pairs(facts, tok, n=24, whole_answer=True)
    assert torch.equal(base.answer, first.answer) and torch.equal(base.readout, first.readout)
    by_id = {f.id: f for f in facts}
    for i, row in enumerate(rows):
        ans = [t for t in base.answer_ids[i].tolist() if t >= 0]
        r = int(base.readout[i])
        assert base.input_ids[i, r + 1 : r + 1 + len(ans)].tolist() == ans  # teacher-forced after the prompt
        want = tok(" " + by_id[row["source_fact"]].answer, add_special_tokens=False)["input_ids"]
        assert ans == want, (row, ans, want)  # the source fact's answer, as the base format tokenizes it
        assert ans[0] == int(base.answer[i])
        foil = [t for t in base.foil_ids[i].tolist() if t >= 0]
        assert foil == tok(" " + by_id[row["base_fact"]].answer, add_special_tokens=False)["input_ids"]
    assert (base.answer_ids >= 0).sum(1).max() > 1  # the lab's answers are multi-token


@pytest.mark.parametrize("site", ["resid_pre", "mlp_out"])
def test_backends_agree_on_the_whole_answer_metric(lab, site):
    from mechrecall.loading import LoadedModel, to_nnsight, to_transformer_lens

    model, tok, ds = lab
    base, source, _ = fact_pairs(ds.factset(ds.pids("heldout")[:12]), tok, n=16, whole_answer=True)
    loaded = LoadedModel(model, tok, "micro", "micro")
    hf = activation_patch(model, base, source, site=site, metric="answer_logprob")
    tl = activation_patch(to_transformer_lens(loaded), base, source, site=site, metric="answer_logprob",
                          backend="transformer_lens")  # fmt: skip
    nn = activation_patch(to_nnsight(loaded), base, source, site=site, metric="answer_logprob", backend="nnsight")
    assert torch.allclose(hf.values, tl.values, atol=1e-4)
    assert torch.allclose(hf.values, nn.values, atol=1e-4)
    assert torch.allclose(hf.base, nn.base, atol=1e-4) and torch.allclose(hf.source, tl.source, atol=1e-4)
