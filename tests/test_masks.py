"""Masks from hand-built importances, their statistics, and localization against slicing by hand (Llama + GQA)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from mechrecall.masks import (
    MaskComparison,
    block_matrices,
    gini,
    jaccard,
    localize,
    mask_and,
    mask_count,
    mask_fraction,
    mask_minus,
    masked_cosines,
    random_mask_like,
    random_overlap,
    top_share,
    topk_mask,
)

A = "model.layers.0.self_attn.q_proj.weight"
B = "model.layers.1.mlp.down_proj.weight"


def _imp():
    return {
        A: torch.tensor([[9.0, 1.0], [3.0, 7.0]]),
        B: torch.tensor([[0.5, 8.0, 2.0, 6.0]]),
        "model.embed_tokens.weight": torch.full((3, 2), 100.0),  # not a block matrix: never ranked
    }


def test_topk_per_matrix_and_global_by_hand():
    per = topk_mask(_imp(), 0.5)
    assert set(per) == {A, B}
    assert per[A].tolist() == [[True, False], [False, True]]
    assert per[B].tolist() == [[False, True, False, True]]
    glob = topk_mask(_imp(), 0.5, scope="global")  # 8 values, top 4 = 9, 8, 7, 6
    assert glob[A].tolist() == [[True, False], [False, True]]
    assert glob[B].tolist() == [[False, True, False, True]]
    glob = topk_mask(_imp(), 0.25, scope="global")  # top 2 = 9, 8
    assert glob[A].tolist() == [[True, False], [False, False]] and glob[B].tolist() == [[False, True, False, False]]


def test_shared_mask_and_statistics_by_hand():
    s = {A: torch.tensor([[True, True], [False, False]])}
    q = {A: torch.tensor([[True, False], [True, False]])}
    shared = mask_and(s, q)
    assert shared[A].tolist() == [[True, False], [False, False]]
    assert mask_count(shared) == 1 and mask_fraction(shared) == 0.25
    assert jaccard(s, q) == pytest.approx(1 / 3)
    assert mask_minus(s, q)[A].tolist() == [[False, True], [False, False]]
    exp = random_overlap(0.5, 0.5)
    assert exp["shared_fraction"] == 0.25 and exp["jaccard"] == pytest.approx(1 / 3)


def test_ties_are_broken_deterministically():
    flat = {A: torch.ones(2, 2)}
    assert topk_mask(flat, 0.5)[A].tolist() == [[True, True], [False, False]]


def test_random_mask_keeps_per_matrix_counts():
    m = topk_mask(_imp(), 0.5)
    r = random_mask_like(m, seed=3)
    assert {n: int(v.sum()) for n, v in r.items()} == {n: int(v.sum()) for n, v in m.items()}
    assert all(torch.equal(a, b) for a, b in zip(r.values(), random_mask_like(m, seed=3).values()))


def test_bad_k_and_scope():
    with pytest.raises(ValueError, match="fraction"):
        topk_mask(_imp(), 5.0)
    with pytest.raises(ValueError, match="scope"):
        topk_mask(_imp(), 0.1, scope="per_layer")


def test_block_matrix_filter():
    assert block_matrices("model.layers.3.mlp.gate_proj.weight")
    assert not block_matrices("model.layers.3.input_layernorm.weight")
    assert not block_matrices("model.embed_tokens.weight")


def test_localization_matches_hand_slicing_with_grouped_query_attention():
    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=10)  # fmt: skip
    hd, H, KV = 4, 4, 2
    g = torch.Generator().manual_seed(0)
    shapes = {
        "q_proj": (H * hd, 16), "k_proj": (KV * hd, 16), "v_proj": (KV * hd, 16), "o_proj": (16, H * hd),
        "gate_proj": (24, 16), "up_proj": (24, 16), "down_proj": (16, 24),
    }  # fmt: skip
    mask = {}
    for L in range(2):
        for m, shp in shapes.items():
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            mask[f"model.layers.{L}.{part}.{m}.weight"] = torch.rand(shp, generator=g) < 0.3
    loc = localize(mask, cfg)
    for L in range(2):
        w = {
            m: mask[f"model.layers.{L}.{'self_attn' if 'proj' in m and m[0] in 'qkvo' else 'mlp'}.{m}.weight"]
            for m in shapes
        }
        for h in range(H):
            by_hand = int(w["q_proj"][h * hd : (h + 1) * hd].sum() + w["o_proj"][:, h * hd : (h + 1) * hd].sum())
            assert loc["q_heads"][L, h] == by_hand
            j = h // (H // KV)
            kv = int(w["k_proj"][j * hd : (j + 1) * hd].sum() + w["v_proj"][j * hd : (j + 1) * hd].sum())
            assert loc["heads"][L, h] == pytest.approx(by_hand + kv / (H // KV))
        for j in range(KV):
            assert loc["kv_heads"][L, j] == int(
                w["k_proj"][j * hd : (j + 1) * hd].sum() + w["v_proj"][j * hd : (j + 1) * hd].sum()
            )
        for i in range(24):
            assert loc["neurons"][L, i] == int(
                w["gate_proj"][i].sum() + w["up_proj"][i].sum() + w["down_proj"][:, i].sum()
            )
        assert loc["per_layer"][L] == sum(int(v.sum()) for v in w.values())
        # the units partition the layer: heads + neurons account for every selected entry
        assert loc["heads"][L].sum() + loc["neurons"][L].sum() == pytest.approx(loc["per_layer"][L])
        assert loc["heads_total"][L, 0] == 2 * hd * 16 + 2 * hd * 16 / 2


def test_concentration_measures():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 10.0])) == pytest.approx(0.75)
    assert top_share(np.array([5.0, 1, 1, 1, 1, 1, 0, 0, 0, 0]), 0.1) == pytest.approx(0.5)


def test_masked_cosines_inside_and_outside():
    ga = {A: torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])}
    gb = {A: torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])}
    m = {A: torch.tensor([[True, False], [False, False]])}
    cos = masked_cosines(ga, gb, m)
    assert cos["inside"].tolist() == [1.0]
    assert cos["outside"].item() == pytest.approx(-1.0)


def test_update_and_posthoc_importance(micro_dataset, micro_tokenizer):
    from mechrecall.gradients import answer_batch, per_example_grads
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import build_model
    from mechrecall.masks import posthoc_importance, update_importance

    before = {A: torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    after = {A: torch.tensor([[1.5, 2.0], [1.0, 4.0]])}
    assert update_importance(before, after)[A].tolist() == [[0.5, 0.0], [2.0, 0.0]]
    with pytest.raises(ValueError, match="differ"):
        update_importance(before, {B: torch.zeros(1, 4)})
    model = build_model(get_preset("micro").model, micro_tokenizer, seed=0)
    ex = micro_dataset.query_examples(micro_dataset.pids("heldout")[:2], templates=[0])[:5]
    imp = posthoc_importance(model, micro_tokenizer, ex, batch_size=2)
    grads = per_example_grads(model, answer_batch(micro_tokenizer, ex))
    for n in (A, B):
        assert torch.allclose(imp[n], grads[n].abs().mean(0), atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_default_selection_with_the_model_and_from_names(micro_model):
    from mechrecall import arch

    g = torch.Generator().manual_seed(0)
    imp = {n: torch.rand(p.shape, generator=g) for n, p in micro_model.named_parameters()}
    with_model = topk_mask(imp, 0.1, model=micro_model)
    assert set(with_model) == {n for n, _ in micro_model.named_parameters() if arch.is_block_matrix(n, micro_model)}
    for other in (topk_mask(imp, 0.1), topk_mask(imp, 0.1, model=micro_model.config)):
        assert other.keys() == with_model.keys() and all(torch.equal(other[n], with_model[n]) for n in other)
    assert all(block_matrices(n) == block_matrices(n, micro_model) for n in imp)
    assert not block_matrices("model.layers.0.self_attn.q_proj.bias")
    loc, by_config = localize(with_model, micro_model), localize(with_model, micro_model.config)
    assert loc.keys() == by_config.keys() and all(np.array_equal(loc[k], by_config[k]) for k in loc)
    stats = MaskComparison(with_model, topk_mask(imp, 0.2, model=micro_model), 0.1).stats(micro_model)
    assert len(stats["per_layer_fraction"]) == micro_model.config.num_hidden_layers


def test_fused_and_transposed_names_from_the_names_alone():
    assert block_matrices("gpt_neox.layers.0.attention.query_key_value.weight")
    assert block_matrices("transformer.h.1.attn.c_attn.weight") and block_matrices("transformer.h.1.mlp.c_proj.weight")
    assert block_matrices("model.layers.2.self_attn.qkv_proj.weight") and block_matrices(
        "model.layers.2.mlp.gate_up_proj.weight"
    )
    assert block_matrices("model.language_model.layers.0.mlp.down_proj.weight")
    assert not block_matrices("transformer.h.1.ln_1.weight") and not block_matrices("transformer.wpe.weight")
    assert not block_matrices("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight")
    assert not block_matrices("base_model.model.model.layers.0.self_attn.q_proj.weight")  # a wrapper's prefix


def test_bfloat16_importances_and_models(micro_dataset, micro_tokenizer, micro_model):
    import copy

    from mechrecall.masks import posthoc_importance

    g = torch.Generator().manual_seed(1)
    imp = {n: torch.rand(p.shape, generator=g).to(torch.bfloat16) for n, p in micro_model.named_parameters()}
    mask = topk_mask(imp, 0.05, model=micro_model)
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in mask.values())
    assert all(int(m.sum()) == round(0.05 * m.numel()) for m in mask.values())
    ex = micro_dataset.query_examples(micro_dataset.pids("heldout")[:2], templates=[0])[:4]
    ref = posthoc_importance(micro_model, micro_tokenizer, ex, batch_size=2)
    half = posthoc_importance(copy.deepcopy(micro_model).to(torch.bfloat16), micro_tokenizer, ex, batch_size=2)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in half.values())
    a, b = torch.cat([v.flatten() for v in ref.values()]), torch.cat([half[n].flatten() for n in ref])
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99


@needs_cuda
def test_cuda_importances_give_cpu_masks(micro_model):
    g = torch.Generator().manual_seed(2)
    imp = {n: torch.rand(p.shape, generator=g) for n, p in micro_model.named_parameters()}
    ref = topk_mask(imp, 0.05, model=micro_model)
    got = topk_mask({n: v.cuda() for n, v in imp.items()}, 0.05, model=micro_model)
    assert all(got[n].device.type == "cpu" and torch.equal(got[n], ref[n]) for n in ref)
    grads = {n: torch.randn(3, *m.shape, generator=g) for n, m in ref.items()}
    cos = masked_cosines({n: v.cuda() for n, v in grads.items()}, {n: -v.cuda() for n, v in grads.items()}, ref)
    assert cos["inside"].device.type == "cpu"
    torch.testing.assert_close(cos["inside"], -torch.ones(3))
