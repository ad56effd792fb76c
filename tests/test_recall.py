"""Exact-match scoring: logits at the scored positions only give the same hits as the whole forward's logits."""

import pytest
import torch

from mechrecall.recall import correct_answers
from mechrecall.tokenization import Batch
from tests.tiny_models import ARCHS, tiny_model


def _batch(vocab: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 3, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a padded row
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]
    labels[1, 8:] = ids[1, 8:]
    labels[2, 5:7] = ids[2, 5:7]
    return Batch(ids, mask, labels)


def _reference(model, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    target = batch.labels[:, 1:]
    out = torch.ones_like(batch.labels, dtype=torch.bool)
    out[:, 1:] = (logits[:, :-1].argmax(-1) == target) | (target == -100)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_scored_position_logits_match_the_whole_forward(arch):
    model = tiny_model(arch)
    batch = _batch(512)
    expected = _reference(model, batch)
    got = correct_answers(model, batch)
    assert torch.equal(got, expected)
    labels = batch.labels.clone()  # now score what the model does predict: every scored position is a hit
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels[:, 1:] = torch.where(labels[:, 1:] != -100, logits[:, :-1].argmax(-1), -100)
    right = Batch(batch.input_ids, batch.attention_mask, labels)
    assert correct_answers(model, right).all()


def test_a_model_without_a_known_layout_is_scored_from_its_logits():
    class Oracle(torch.nn.Module):  # no config: the whole-logits path
        def forward(self, input_ids, attention_mask=None):
            logits = torch.full((*input_ids.shape, 512), -1.0)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
            return type("Out", (), {"logits": logits})()

    batch = _batch(512)
    assert correct_answers(Oracle(), batch).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_log_probabilities_match_the_whole_forward(arch):
    """The log-probability of each scored token equals log_softmax of the whole forward's logits; unscored positions
    hold 0, so a row's sum is its answer's log-likelihood."""
    from mechrecall.recall import scored_tokens

    model = tiny_model(arch)
    batch = _batch(512)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    target = batch.labels[:, 1:]
    scored = target != -100
    expected = torch.zeros(batch.labels.shape)
    full = logits[:, :-1].log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    expected[:, 1:] = torch.where(scored, full, 0.0)
    hit, logprob = scored_tokens(model, batch)
    assert torch.equal(hit, _reference(model, batch))
    assert logprob.dtype == torch.float32 and (logprob <= 0).all() and (logprob[:, 1:][scored] < 0).all()
    torch.testing.assert_close(logprob, expected, rtol=1e-5, atol=1e-5)


def test_answer_scores_give_exact_match_and_the_answers_nll(micro_dataset, micro_tokenizer):
    """answer_scores' nll is minus the summed log-probability of each example's scored tokens (answer + end of text),
    and its exact match is each example's own correct_answers row, scored alone."""
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import build_model
    from mechrecall.recall import answer_scores, correct_answers, exact_match, scored_tokens
    from mechrecall.tokenization import collate_examples, encode_example

    model = build_model(get_preset("micro").model, micro_tokenizer, seed=0).eval()
    examples = micro_dataset.query_examples(micro_dataset.pids("validation")[:5])
    scores = answer_scores(model, micro_tokenizer, examples, batch_size=4)  # two chunks
    assert torch.equal(scores.correct, exact_match(model, micro_tokenizer, examples))
    for i, ex in enumerate(examples):
        alone = collate_examples([encode_example(micro_tokenizer, ex)], micro_tokenizer.pad_token_id)
        n_scored = int((alone.labels != -100).sum())
        _, logprob = scored_tokens(model, alone)
        assert n_scored >= 2  # the answer and end-of-text
        torch.testing.assert_close(scores.nll[i], -logprob.sum(), rtol=1e-5, atol=1e-5)
        assert bool(scores.correct[i]) == bool(correct_answers(model, alone).all())
    assert (scores.nll > 0).all()


def test_answer_in_reply_credits_every_exact_match_and_ignores_padding(micro_run):
    """The answer in a greedy reply: every exact match counts (greedy decoding then starts with the answer), and the
    left-padded batch gives each prompt the reply it gets alone."""
    from mechrecall.lab.models import lab_dataset
    from mechrecall.loading import load_model
    from mechrecall.recall import _normalized, answer_in_reply, exact_match
    from mechrecall.tokenization import encode_example

    _, reg = micro_run
    loaded = load_model("micro-s0-mixed", registry=reg)
    model, tok = loaded.model, loaded.tokenizer
    data = lab_dataset(loaded)
    examples = data.query_examples(data.pids("train")[:6]) + data.query_examples(data.pids("heldout")[:6])
    exact = exact_match(model, tok, examples)
    found = answer_in_reply(model, tok, examples, max_new_tokens=8, batch_size=5)
    assert exact.any() and not exact.all()  # a mix, so both outcomes are checked
    assert (found | ~exact).all()
    for ex, hit in zip(examples, found.tolist(), strict=True):
        enc = encode_example(tok, ex)
        ids = torch.tensor([enc.input_ids[: enc.prompt_len]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert hit == (_normalized(ex.answer) in _normalized(reply)), (ex.text, reply)


def test_eval_options_for_fact_files_need_one(micro_run, capsys):
    from mechrecall.__main__ import main

    _, reg = micro_run
    assert main(["eval", "micro-s0-mixed", "--registry", str(reg), "--match", "in-reply"]) == 2
    assert "apply to --facts FILE" in capsys.readouterr().err
