"""Every analysis of the toolkit on every architecture mechrecall.arch supports (tiny random models, offline).

Facts are built by hand (:class:`mechrecall.facts.Example` with character spans) and tokenized by a word-level
``PreTrainedTokenizerFast`` made here from the words used (pad / bos / eos = 0 / 1 / 2, as the tiny models' configs),
so nothing depends on the lab. Per architecture: residual caches at roles (HF hooks against the model's own
``output_hidden_states``; TransformerLens and nnsight equal to HF where they boot), per-example gradients under HF
names (``vmap`` == a loop of ordinary backwards), masks selected and localized (== slicing written here from the
modeling code), ablation and grafting changing exactly the masked entries, integrated gradients complete within 5 %.
"""

import copy

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mechrecall import arch
from mechrecall.attribution import _embeds, _target, baseline_embeds, integrated_gradients, role_inputs
from mechrecall.cache import cache_residuals, default_sites
from mechrecall.facts import Example, Fact, FactSet
from mechrecall.gradients import answer_batch, per_example_grads, per_example_grads_loop, scored_positions
from mechrecall.interventions import ablate, graft, loaded, recall_under, state_of
from mechrecall.masks import localize, topk_mask
from mechrecall.tokenization import encode_example
from tests.tiny_models import ARCHS, tiny_model

VOCAB = 512
PEOPLE = [("Anya Forger", "Paris"), ("Bob Stone", "Rome"), ("Carl Weiss", "Oslo"), ("Dana Lee", "Lima")]
# Backends that cannot wrap some architectures (the test is skipped with this reason when booting fails there).
CANNOT_BOOT = {
    "tl": {
        "gemma3_text": "TransformerLens 4.3's bridge has no adapter for Gemma3ForCausalLM",
        "gemma3": "TransformerLens 4.3's bridge expects Gemma3Model.embed_tokens (no multimodal Gemma 3 adapter)",
        "olmo2": "TransformerLens 4.3's bridge has no adapter for Olmo2ForCausalLM",
    },
    "nnsight": {},
}


# ------------------------------------------------------------------------------------------------ facts by hand
def _example(subject_id: int, fmt: str, pieces: list[tuple[str, str | None]]) -> Example:
    """Join ``(text, role)`` pieces with spaces, recording each role's character spans."""
    text, spans = "", {}
    for words, role in pieces:
        start = len(text) + (1 if text else 0)
        text = f"{text} {words}" if text else words
        if role is not None:
            spans.setdefault(role, []).append((start, len(text)))
    return Example(subject_id, "birth_city", fmt, text, {r: tuple(s) for r, s in spans.items()})


def _facts() -> FactSet:
    facts = []
    for i, (name, city) in enumerate(PEOPLE):
        other = PEOPLE[(i + 1) % len(PEOPLE)][1]
        storage = _example(
            i,
            "storage",
            [
                (name, None),
                (f"lives in {other} .", None),
                (name, "subject"),
                ("was born in", "relation"),
                (city, "answer"),
            ],
        )
        query = _example(
            i,
            "query",
            [
                ("Where was", "relation"),
                (name, "subject"),
                ("born", "relation"),
                ("? Answer :", "cue"),
                (city, "answer"),
            ],
        )
        facts.append(Fact(id=f"f{i}", subject=name, relation="birth_city", answer=city, storage=(storage,),
                          query=(query,), split="heldout"))  # fmt: skip
    return FactSet(facts, "by hand")


def _tokenizer(facts: FactSet, bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    pre = pre_tokenizers.Whitespace()
    for ex in facts.examples("storage") + facts.examples("query"):
        for word, _ in pre.pre_tokenize_str(ex.text):
            vocab.setdefault(word, len(vocab))
    assert len(vocab) < VOCAB - 3  # clear of the multimodal Gemma 3's image tokens
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    if bos:  # (without: the text starts at position 0, as with SmolLM2's or GPT-2's tokenizer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def facts():
    return _facts()


@pytest.fixture(scope="module")
def tok(facts):
    return _tokenizer(facts)


def test_hand_made_facts_tokenize_on_role_boundaries(facts, tok):
    enc = encode_example(tok, facts.examples("storage")[0], add_eos=False)
    words = tok.convert_ids_to_tokens(list(enc.input_ids))
    assert words[0] == "<s>" and [words[p] for p in enc.roles["subject"]] == ["Anya", "Forger"]
    assert [words[p] for p in enc.roles["relation"]] == ["was", "born", "in"] and words[enc.prompt_len] == "Paris"
    q = encode_example(tok, facts.examples("query")[0])
    assert q.input_ids[-1] == tok.eos_token_id == 2 and len(q.answer_positions) == 2


# ------------------------------------------------------------------------------------------------ residual caches
@pytest.mark.parametrize("name", ARCHS)
def test_residual_cache_at_roles(name, facts, tok):
    model = tiny_model(name, VOCAB)
    examples = facts.examples("storage") + facts.examples("query")
    cache = cache_residuals(model, tok, examples, batch_size=3)  # padded batches
    n_layers = arch.n_layers(model)
    expected_sites = ["resid_pre", "resid_post"] if name == "gpt_neox" else ["resid_pre", "resid_mid", "resid_post"]
    assert cache.meta["sites"] == expected_sites == list(default_sites(model))
    for states in cache.data.values():
        assert states.dtype == torch.float32 and states.device.type == "cpu"
        assert states.shape == (n_layers, len(examples), len(cache.roles), arch.dims(model).d_model)
    for i, ex in enumerate(examples):
        enc = encode_example(tok, ex, add_eos=False)
        ids = torch.tensor([enc.input_ids[: enc.prompt_len]])
        handles, attn = [], {}
        if name != "gpt_neox":
            for L in range(n_layers):
                module = arch.residual_contribution(model, L, "attn")
                handles.append(module.register_forward_hook(
                    lambda m, a, out, L=L, attn=attn: attn.__setitem__(L, out[0] if isinstance(out, tuple) else out)
                ))  # fmt: skip
        try:
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        finally:
            for h in handles:
                h.remove()
        pos = [enc.last(r) for r in cache.roles]
        for L in range(n_layers):
            torch.testing.assert_close(cache["resid_pre", L][i], hs[L][0, pos], rtol=0, atol=1e-5)
            if L + 1 < n_layers:
                torch.testing.assert_close(cache["resid_post", L][i], cache["resid_pre", L + 1][i], rtol=0, atol=1e-6)
            if name != "gpt_neox":  # resid_mid = resid_pre + what attention adds (post-normed in Gemma / OLMo-2)
                mid = hs[L][0, pos] + attn[L][0, pos]
                torch.testing.assert_close(cache["resid_mid", L][i], mid, rtol=0, atol=1e-5)
    if name == "gpt_neox":
        with pytest.raises(ValueError, match="gpt_neox has no resid_mid"):
            cache_residuals(model, tok, examples, sites=("resid_pre", "resid_mid"))


def _wrapped(name: str, backend: str, model, tok):
    """``model`` in TransformerLens (``"tl"``) or nnsight; skips the test where that backend cannot boot it."""
    from mechrecall.loading import LoadedModel, to_nnsight, to_transformer_lens

    wrap = to_transformer_lens if backend == "tl" else to_nnsight
    try:
        return wrap(LoadedModel(model, tok, "tiny", "tiny"))
    except Exception as e:
        if name in CANNOT_BOOT[backend]:
            pytest.skip(f"{CANNOT_BOOT[backend][name]} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        raise


@pytest.mark.parametrize("backend", ["tl", "nnsight"])
@pytest.mark.parametrize("name", ARCHS)
def test_residual_backends_agree_with_hugging_face(name, backend, facts, tok):
    model = tiny_model(name, VOCAB)
    wrapped = _wrapped(name, backend, model, tok)
    examples = facts.examples("storage") + facts.examples("query")
    ref = cache_residuals(model, tok, examples, batch_size=3)
    got = cache_residuals(wrapped, tok, examples, backend=backend, batch_size=3)
    assert got.meta["sites"] == ref.meta["sites"]
    for site in ref.data:
        torch.testing.assert_close(got.data[site], ref.data[site], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", ARCHS)
def test_per_example_grads_under_hf_names(name, facts, tok):
    model = copy.deepcopy(tiny_model(name, VOCAB))  # the loop reference fills .grad
    batch = answer_batch(tok, facts.examples("query")[:3])
    fast, slow = (
        per_example_grads(model, batch),
        per_example_grads_loop(model, batch),
    )  # (slow: every position's logits)
    keep = scored_positions(model, batch.labels)  # the fast path unembeds these positions only
    assert keep is not None and 0 < len(keep) < batch.labels.shape[1] - 1
    assert list(fast) == list(slow) == [n for n, _ in model.named_parameters()]  # tied weights once
    assert all(p.grad is None for p in model.parameters())
    for n, g in fast.items():
        assert g.shape == (3, *dict(model.named_parameters())[n].shape)
        torch.testing.assert_close(g, slow[n], rtol=0, atol=1e-5, msg=n)
    assert all(bool(g.abs().sum() > 0) for n, g in fast.items() if arch.is_block_matrix(n, model))


# ------------------------------------------------------------------------------------------------ masks
def _heads(w: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    """Per head: sums of consecutive blocks of ``hd`` rows."""
    return w.reshape(n, hd, -1).sum((1, 2))


def _head_cols(w: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    return w.reshape(w.shape[0], n, hd).sum((0, 2))


def _hand_units(suffix: str, w: torch.Tensor, d: arch.Dims) -> dict[str, torch.Tensor]:
    """Units of a block weight's entries, sliced as each family's modeling code uses the weight."""
    H, KV, hd, F = d.n_heads, d.n_kv_heads, d.head_dim, d.d_mlp
    w = w.long()
    if suffix == "self_attn.q_proj.weight":
        return {"q_heads": _heads(w, H, hd)}
    if suffix in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return {"kv_heads": _heads(w, KV, hd)}
    if suffix in ("self_attn.o_proj.weight", "attention.dense.weight"):  # columns read head h's output
        return {"q_heads": _head_cols(w, H, hd)}
    if suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.dense_h_to_4h.weight"):
        return {"neurons": w.sum(1)}
    if suffix in ("mlp.down_proj.weight", "mlp.dense_4h_to_h.weight"):
        return {"neurons": w.sum(0)}
    if suffix == "self_attn.qkv_proj.weight":  # Phi-3: rows [q | k | v]
        q, k, v = w[: H * hd], w[H * hd : (H + KV) * hd], w[(H + KV) * hd :]
        return {"q_heads": _heads(q, H, hd), "kv_heads": _heads(k, KV, hd) + _heads(v, KV, hd)}
    if suffix == "mlp.gate_up_proj.weight":  # Phi-3: gate rows, then up rows
        return {"neurons": w[:F].sum(1) + w[F:].sum(1)}
    if suffix == "attention.query_key_value.weight":  # GPT-NeoX: .view(..., heads, 3 * hd), then chunk(3)
        per_head = w.reshape(H, 3, hd, -1)
        return {"q_heads": per_head[:, 0].sum((1, 2)), "kv_heads": per_head[:, 1:].sum((1, 2, 3))}
    if suffix == "attn.c_attn.weight":  # GPT-2 Conv1D [in, out]: columns [q | k | v], then heads
        q, k, v = w[:, : H * hd], w[:, H * hd : 2 * H * hd], w[:, 2 * H * hd :]
        return {"q_heads": _head_cols(q, H, hd), "kv_heads": _head_cols(k, H, hd) + _head_cols(v, H, hd)}
    if suffix == "attn.c_proj.weight":  # rows read head h's output
        return {"q_heads": _heads(w, H, hd)}
    if suffix == "mlp.c_fc.weight":
        return {"neurons": w.sum(0)}
    if suffix == "mlp.c_proj.weight":
        return {"neurons": w.sum(1)}
    raise AssertionError(f"no hand slicing for {suffix}")


def _random_importance(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ARCHS)
def test_masks_selected_and_localized_like_hand_slicing(name):
    model = tiny_model(name, VOCAB)
    d, blocks = arch.dims(model), arch.spec_of(model).blocks
    imp = _random_importance(model)
    mask = topk_mask(imp, 0.1, model=model)
    assert set(mask) == {n for n, _ in model.named_parameters() if arch.is_block_matrix(n, model)}
    assert all(int(m.sum()) == round(0.1 * m.numel()) for m in mask.values())
    by_names = topk_mask(imp, 0.1)  # the default filter judged from the names alone agrees
    assert by_names.keys() == mask.keys() and all(torch.equal(by_names[n], mask[n]) for n in mask)
    loc = localize(mask, model)
    assert all(np.array_equal(v, localize(mask, model.config)[k]) for k, v in loc.items())
    want = {
        "per_layer": np.zeros(d.n_layers),
        "q_heads": np.zeros((d.n_layers, d.n_heads)),
        "kv_heads": np.zeros((d.n_layers, d.n_kv_heads)),
        "neurons": np.zeros((d.n_layers, d.d_mlp)),
    }
    for n, m in mask.items():
        layer, suffix = n.removeprefix(f"{blocks}.").split(".", 1)
        want["per_layer"][int(layer)] += int(m.sum())
        for unit, counts in _hand_units(suffix, m, d).items():
            want[unit][int(layer)] += counts.numpy()
            for i in range(len(counts)):  # the arch layer's unit_index selects the same entries
                assert int(m[arch.unit_index(n, model, unit, i)].sum()) == int(counts[i]), (n, unit, i)
    for key, value in want.items():
        np.testing.assert_array_equal(loc[key], value, err_msg=key)
    g = d.n_heads // d.n_kv_heads
    np.testing.assert_allclose(loc["heads"], loc["q_heads"] + np.repeat(loc["kv_heads"], g, axis=1) / g)
    # the units partition each layer's block matrices, selected entries and totals alike
    np.testing.assert_allclose(loc["heads"].sum(1) + loc["neurons"].sum(1), loc["per_layer"])
    np.testing.assert_allclose(loc["heads_total"].sum(1) + loc["neurons_total"].sum(1), loc["per_layer_total"])


# ------------------------------------------------------------------------------------------------ interventions
@pytest.mark.parametrize("name", ARCHS)
def test_ablation_and_grafting_change_exactly_the_masked_entries(name, facts, tok):
    model = copy.deepcopy(tiny_model(name, VOCAB))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    mask = topk_mask(_random_importance(model, seed=1), 0.05, model=model)
    sd = state_of(model)
    donor = {n: t + 1.0 for n, t in sd.items()}  # differs from sd in every entry

    def changed_by(state) -> dict[str, torch.Tensor]:
        with loaded(model, state):
            return {n: t != before[n] for n, t in model.state_dict().items()}

    zero = changed_by(ablate(sd, mask, "zero"))
    grafted = changed_by(graft(sd, donor, mask))
    based = changed_by(ablate(sd, mask, "base", base=donor))
    for n, t in before.items():
        m = mask.get(n, torch.zeros_like(t, dtype=torch.bool))  # buffers and tied copies are never in the mask
        assert torch.equal(zero[n], m & (t != 0)), n
        assert torch.equal(grafted[n], m) and torch.equal(based[n], m), n
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # loaded() put everything back
    undone = graft(ablate(sd, mask, "mean"), sd, mask)
    assert all(torch.equal(undone[n], sd[n]) for n in sd)
    heldout = recall_under(model, tok, facts, ablate(sd, mask, "zero"), ("heldout",))["heldout"]
    assert 0.0 <= heldout <= 1.0


# ------------------------------------------------------------------------------------------------ attribution
@pytest.mark.parametrize("name", ARCHS)
def test_integrated_gradients_are_complete(name, facts, tok):
    model = tiny_model(name, VOCAB)
    inputs = role_inputs(tok, facts.examples("storage"))
    with torch.no_grad():  # the attributed input is what the embedding module outputs (Gemma: already scaled) ...
        by_ids = model(input_ids=inputs.input_ids).logits
        by_embeds = model(inputs_embeds=_embeds(model, inputs.input_ids)).logits  # ... and is not scaled again
        mean = arch.embedding(model)(torch.arange(arch.dims(model).vocab)).mean(0)
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-5)
    rows = torch.arange(len(inputs.readout))  # the target: the full forward's log-prob, unembedded at the readout only
    full = by_ids[rows, inputs.readout].float().log_softmax(-1)[rows, inputs.answer]
    with torch.no_grad():
        torch.testing.assert_close(_target(model, _embeds(model, inputs.input_ids), inputs.readout, inputs.answer),
                                   full, rtol=0, atol=1e-5)  # fmt: skip
    base = baseline_embeds(model, inputs)
    torch.testing.assert_close(base[~inputs.fixed], mean.expand(int((~inputs.fixed).sum()), -1), rtol=1e-5, atol=1e-6)
    r = integrated_gradients(model, inputs, steps=16, max_steps=256)
    assert r.attributions.dtype == torch.float32 and r.attributions.device.type == "cpu"
    assert r.converged and (r.delta.abs() <= 0.05 * r.gap.abs() + 1e-3).all(), (r.delta, r.gap, r.steps)
    assert (r.attributions[inputs.fixed] == 0).all()


def test_without_bos_the_first_token_is_held_fixed(facts):
    """A tokenizer that adds no <bos>: position 0 (the text's first token, the model's attention sink) is fixed by
    default, in the baseline too, and gets no attribution or role; ``fix_first=False`` attributes it."""
    tok = _tokenizer(facts, bos=False)
    examples = facts.examples("storage")
    assert encode_example(tok, examples[0], add_eos=False).input_ids[0] != tok.bos_token_id
    inputs = role_inputs(tok, examples)
    assert inputs.fixed[:, 0].all()
    stacked = torch.stack([inputs.roles[r] for r in inputs.roles]).long()
    assert (stacked.sum(0) + inputs.fixed.long() == 1).all() and not stacked[:, :, 0].any()
    assert inputs.roles["relation"].any(1).all() and inputs.roles["answer_preceding"].sum(1).eq(1).all()
    free = role_inputs(tok, examples, fix_first=False)
    assert not free.fixed[:, 0].any() and free.roles["subject_elsewhere"][:, 0].all()  # the name starts the texts
    model = tiny_model("llama", VOCAB)
    base = baseline_embeds(model, inputs)
    torch.testing.assert_close(base[:, 0], _embeds(model, inputs.input_ids)[:, 0], rtol=0, atol=0)
    r = integrated_gradients(model, inputs, steps=16, max_steps=256)
    assert r.converged and (r.attributions[:, 0] == 0).all()


# ------------------------------------------------------------------------------------------------ patching backends
@pytest.mark.parametrize("backend", ["tl", "nnsight"])
@pytest.mark.parametrize("name", ARCHS)
def test_patching_backends_agree_with_hugging_face(name, backend, facts, tok):
    """The TransformerLens / nnsight sweeps equal the HF one (Gemma 2's soft-capped logits included)."""
    from mechrecall.patching import activation_patch, fact_pairs

    model = tiny_model(name, VOCAB)
    wrapped = _wrapped(name, backend, model, tok)
    base, source, _ = fact_pairs(facts, tok, whole_answer=True)
    for site in ("resid_pre", "mlp_out"):
        ref = activation_patch(model, base, source, site=site, metric=["logit_diff", "answer_logprob"])
        for metric in ("logit_diff", "answer_logprob"):
            got = activation_patch(wrapped, base, source, site=site, metric=metric,
                                   backend="transformer_lens" if backend == "tl" else "nnsight")  # fmt: skip
            torch.testing.assert_close(got.values, ref[metric].values, rtol=0, atol=1e-4)
            torch.testing.assert_close(got.base, ref[metric].base, rtol=0, atol=1e-4)
