import copy

import pytest
import torch

from mechrecall.lab.adapters import (
    adapter_state,
    apply_lora,
    base_updates,
    load_adapter_state,
    merge_adapters,
    merged_copy,
    tie_gradients,
    unwrapped_name,
)
from mechrecall.lab.config import StageConfig
from tests.tiny_models import tiny_model

# each family's attention / MLP projection names (what a researcher writes in lora_targets)
TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "o_proj"),
    "gemma3_text": ("k_proj", "up_proj"),
    "phi3": ("qkv_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt2": ("c_attn", "c_fc"),  # no embedding adapter: peft cannot tie GPT-2's (test below)
}


def _stage(arch, embedding_rank=4, **kw):
    return StageConfig(steps=1, lr=1e-3, trainable="lora", lora_rank=4, lora_targets=TARGETS[arch],
                       lora_embedding_rank=embedding_rank, **kw)  # fmt: skip


def _adapted(arch, embedding_rank=None, seed=0):
    embedding_rank = (0 if arch == "gpt2" else 4) if embedding_rank is None else embedding_rank
    base = copy.deepcopy(tiny_model(arch))
    peft_model, params = apply_lora(base, _stage(arch, embedding_rank), seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # B starts at zero: make every update non-zero
    return peft_model, params


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_merged_model_computes_what_the_adapted_one_did(arch):
    original = tiny_model(arch)
    peft_model, params = _adapted(arch)
    assert params and all(".lora_" in unwrapped_name(n) for n, p in peft_model.named_parameters() if p.requires_grad)
    x = torch.randint(3, 400, (2, 12))
    adapted = peft_model(input_ids=x).logits
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    copied = merged_copy(peft_model)
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())  # left exactly as it was
    torch.testing.assert_close(peft_model(input_ids=x).logits, adapted, rtol=0, atol=0)
    merged = merge_adapters(peft_model)
    assert type(merged) is type(original)
    for m in (copied, merged):
        torch.testing.assert_close(m(input_ids=x).logits, adapted, rtol=1e-4, atol=1e-4)
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in original.named_parameters()]
        tied = original.get_output_embeddings().weight is original.get_input_embeddings().weight
        assert (m.get_output_embeddings().weight is m.get_input_embeddings().weight) == tied
    assert not (adapted - original(input_ids=x).logits).abs().max() < 1e-3  # the adapters did change the model


def test_base_updates_are_merged_minus_base_under_hf_names():
    original = tiny_model("llama")
    peft_model, _ = _adapted("llama")
    updates = base_updates(peft_model)
    assert set(updates) == {"model.embed_tokens.weight"} | {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
    }
    merged = dict(merge_adapters(peft_model).named_parameters())
    base = dict(original.named_parameters())
    for name, delta in updates.items():
        torch.testing.assert_close(merged[name].detach() - base[name].detach(), delta, rtol=1e-5, atol=1e-6)


def test_adapter_state_restores_a_model_rebuilt_from_merged_weights():
    peft_model, _ = _adapted("qwen2")
    state = adapter_state(peft_model)
    x = torch.randint(3, 400, (2, 12))
    expected = peft_model(input_ids=x).logits
    rebuilt, _ = apply_lora(merged_copy(peft_model), _stage("qwen2"), seed=1)  # other init, merged weights
    load_adapter_state(rebuilt, state)
    torch.testing.assert_close(rebuilt(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_updates(rebuilt)["model.embed_tokens.weight"],
                               base_updates(peft_model)["model.embed_tokens.weight"])  # fmt: skip


def test_initialisation_is_a_function_of_the_seed():
    a, _ = apply_lora(copy.deepcopy(tiny_model("llama")), _stage("llama"), seed=3)
    torch.manual_seed(123)  # the global RNG does not matter
    b, _ = apply_lora(copy.deepcopy(tiny_model("llama")), _stage("llama"), seed=3)
    c, _ = apply_lora(copy.deepcopy(tiny_model("llama")), _stage("llama"), seed=4)
    sa, sb, sc = (adapter_state(m)["factors"] for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_trace_base_grads_leaves_base_weights_out_of_the_optimizer():
    peft_model, params = apply_lora(copy.deepcopy(tiny_model("llama")), _stage("llama"), 0, trace_base_grads=True)
    assert all(p.requires_grad for p in peft_model.parameters())
    names = {id(p): unwrapped_name(n) for n, p in peft_model.named_parameters()}
    factors = {unwrapped_name(n) for n, p in peft_model.named_parameters() if ".lora_" in n}
    # (the tied unembedding's factors are views of the embedding's: not a second trainable set)
    assert {names[id(p)] for p in params} == {n for n in factors if not n.startswith("lm_head.")}


@pytest.mark.parametrize(
    "update, message",
    [
        ({"adapter_options": {"no_such_option": 1}}, r"adapter_options \{'no_such_option': 1\}: peft's LoraConfig"),
        ({"adapter_options": {"lora_dropout": 0.1}}, "adapter_options.lora_dropout"),
        ({"adapter_options": {"r": 4}}, "adapter_options.r: set it through the stage's own"),
        ({"lora_targets": ("q_proj", "qkv")}, r"lora_targets \['qkv'\] match no Linear layer of the LlamaForCausalLM"),
        ({"lora_targets": ("q_proj", "lm_head")}, r"'lm_head' is tied to the input embedding"),
        ({"adapter_options": {"modules_to_save": ["lm_head"]}}, "adapter_options.modules_to_save: not supported"),
    ],
)
def test_bad_adapter_options_fail_in_one_line(update, message):
    cfg = _stage("llama").model_copy(update=update)
    with pytest.raises(ValueError, match=message):
        apply_lora(copy.deepcopy(tiny_model("llama")), cfg, 0)


def test_an_embedding_adapter_peft_cannot_tie_is_refused():
    with pytest.raises(
        ValueError, match=r"peft cannot tie an embedding adapter of GPT2LMHeadModel \(embedding 'transformer.wte'\)"
    ):
        apply_lora(copy.deepcopy(tiny_model("gpt2")), _stage("gpt2"), 0)


def test_peft_options_pass_through():
    """DoRA through adapter_options: peft builds it and the merge still reproduces the adapted model."""
    cfg = _stage("llama", embedding_rank=0).model_copy(update={"adapter_options": {"use_dora": True}})
    peft_model, params = apply_lora(copy.deepcopy(tiny_model("llama")), cfg, 0)
    assert any("magnitude" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(3, 400, (2, 12))
    adapted = peft_model(input_ids=x).logits
    torch.testing.assert_close(merge_adapters(peft_model)(input_ids=x).logits, adapted, rtol=1e-4, atol=1e-4)


def test_a_tied_embedding_adapter_is_one_set_of_factors_updated_once_per_step():
    """peft gives the tied unembedding its own factor tensors that view the embedding's: they stay out of the
    optimizer and tie_gradients folds their gradient in, so one AdamW step moves each shared entry by at most lr
    (a second update through the views would move it up to twice as far)."""
    peft_model, params = _adapted("llama")
    names = {id(p): unwrapped_name(n) for n, p in peft_model.named_parameters()}
    assert not any(names[id(p)].startswith("lm_head") for p in params)
    emb = peft_model.get_input_embeddings()
    a, b = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
    x = torch.randint(3, 400, (2, 12))
    peft_model(input_ids=x, labels=x).loss.backward()
    head_grad = peft_model.get_output_embeddings().lora_B["default"].weight.grad.clone()
    own = a.grad.clone()
    tie_gradients(peft_model)
    torch.testing.assert_close(a.grad, own + head_grad.T)  # the shared update's whole gradient
    assert peft_model.get_output_embeddings().lora_B["default"].weight.grad is None
    before = {"A": a.detach().clone(), "B": b.detach().clone()}
    torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0).step()
    for t, name in ((a, "A"), (b, "B")):
        assert float((t.detach() - before[name]).abs().max()) <= 1e-2 * (1 + 1e-4), name


def test_resuming_with_other_targets_names_what_is_missing():
    peft_model, _ = _adapted("llama")
    state = adapter_state(peft_model)
    wider = _stage("llama").model_copy(update={"lora_targets": ("q_proj", "v_proj", "down_proj")})
    rebuilt, _ = apply_lora(merged_copy(peft_model), wider, seed=0)
    with pytest.raises(ValueError, match=r"lacks the base weights of \['model.layers.0.mlp.down_proj.weight'"):
        load_adapter_state(rebuilt, state)
