"""Exact-match recall of facts, teacher-forced: one forward per batch, equal to greedy decoding.

A text counts as recalled when the argmax at every answer token is right, and for the query format also at the
end-of-text token after it. That is exactly greedy exact match (greedy decoding emits the answer and stops iff each
of those argmaxes is right; ``tests/lab/test_evaluate.py`` checks this against ``generate``). Multi-token answers are
scored on every token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechrecall.devices import model_device
from mechrecall.facts import Example, FactSet
from mechrecall.tokenization import Batch, collate_examples, encode_example, pad_id

__all__ = [
    "scored_logits",
    "scored_tokens",
    "correct_answers",
    "row_chunks",
    "AnswerScores",
    "answer_scores",
    "exact_match",
    "recall",
    "answer_in_reply",
]


@torch.no_grad()
def scored_tokens(model, batch: Batch) -> tuple[Bool[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Per position: whether the scored token (``labels != -100``) is the argmax of the previous position's logits
    (as :func:`correct_answers`), and its log-probability there (float32).

    Unscored positions are True and 0.0, so ``.all(-1)`` over a row's positions is that row's exact match and
    ``-.sum(-1)`` its answer's negative log-likelihood.
    """
    hit = torch.ones_like(batch.labels, dtype=torch.bool)
    logprob = torch.zeros(batch.labels.shape, dtype=torch.float32, device=batch.labels.device)
    rows, cols, picked, wanted = scored_logits(model, batch)
    hit[rows, cols + 1] = (picked.argmax(-1) == wanted).to(hit.device)
    # gather minus logsumexp rather than log_softmax, whose output would be one more [scored, vocab] tensor
    lp = picked.gather(-1, wanted[:, None])[:, 0].float() - picked.float().logsumexp(-1)
    logprob[rows, cols + 1] = lp.to(logprob.device)
    return hit, logprob


@torch.no_grad()
def correct_answers(model, batch: Batch) -> Bool[Tensor, "batch pos"]:
    """Per position: the scored token (``labels != -100``) is the argmax of the previous position's logits.

    Unscored positions are True, so ``.all(-1)`` over a row's positions is that row's exact match. For an architecture
    :mod:`mechrecall.arch` knows, the vocabulary logits are computed at the scored positions only (the decoder's
    final-normed states, then the unembedding): the full ``[batch, pos, vocab]`` logits of a 128k-vocabulary model
    would cost most of the forward's time and gigabytes of memory for a handful of answer tokens per row.
    """
    out = torch.ones_like(batch.labels, dtype=torch.bool)
    rows, cols, picked, wanted = scored_logits(model, batch)
    out[rows, cols + 1] = (picked.argmax(-1) == wanted).to(out.device)
    return out


def scored_logits(model, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows, columns) of the scored targets (``labels[:, 1:] != -100``, row-major), the vocabulary logits that
    predict them (``[n_scored, vocab]``, on the model's last device) and the target ids there.

    For an architecture :mod:`mechrecall.arch` knows, the decoder stack (final norm included) runs on the whole batch
    and the unembedding (with any logit soft-capping) on the scored states alone; any other model runs its whole
    forward. Differentiable: training's ``lm_loss(scored_logits=True)`` is the cross-entropy of its output."""
    target = batch.labels[:, 1:]
    rows, cols = (target != -100).nonzero(as_tuple=True)
    inner = _known_architecture(model)
    if inner is None:  # any other callable returning .logits (a test's stand-in, a wrapped model)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = logits[:, :-1][rows.to(logits.device), cols.to(logits.device)]
    else:
        from mechrecall import arch

        normed = arch.base_model(inner)(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        normed = normed.last_hidden_state
        # (a model split over devices returns its states on the last one)
        picked = arch.normed_to_logits(inner, normed[rows.to(normed.device), cols.to(normed.device)])
    return rows, cols, picked, target[rows, cols].to(picked.device)


def _known_architecture(model):
    """The plain Hugging Face causal LM behind ``model`` (unwrapping a ``peft`` model) if :mod:`mechrecall.arch` has
    its layout, else None."""
    from torch.distributed.fsdp import FSDPModule

    from mechrecall.arch import UnsupportedArchitecture, spec_of

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "config") or isinstance(inner, FSDPModule):  # a sharded model runs its whole forward
        return None
    try:
        spec_of(inner)
    except UnsupportedArchitecture:
        return None
    return inner


def row_chunks(n: int, size: int):
    for i in range(0, n, size):
        yield torch.arange(i, min(n, i + size))


@dataclass
class AnswerScores:
    """Per example: greedy exact match of the answer (and end-of-text for queries), and the answer's negative
    log-likelihood under teacher forcing (summed over the same scored tokens, in nats): a continuous companion of
    exact match that moves before any answer flips (useful for choosing a budget on a few dozen questions)."""

    correct: Bool[Tensor, " n"]
    nll: Float[Tensor, " n"]


def answer_scores(model, tokenizer, examples: Sequence[Example], batch_size: int = 512) -> AnswerScores:
    """:class:`AnswerScores` of ``examples`` (one teacher-forced forward per batch), on the CPU."""
    batch = _example_batch(tokenizer, examples)
    device = model_device(model)
    correct, nll = [], []
    for rows in row_chunks(len(batch), batch_size):
        hit, logprob = scored_tokens(model, batch.index(rows).to(device))
        correct.append(hit.all(-1).cpu())
        nll.append(-logprob.sum(-1).cpu())
    return AnswerScores(torch.cat(correct), torch.cat(nll))


def exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int = 512) -> Bool[Tensor, " n"]:
    """Per example: greedy exact match of its answer (and end-of-text for queries), on the CPU (no log-probabilities:
    :func:`answer_scores` gives both)."""
    batch = _example_batch(tokenizer, examples)
    device = model_device(model)
    return torch.cat(
        [
            correct_answers(model, batch.index(rows).to(device)).all(-1).cpu()
            for rows in row_chunks(len(batch), batch_size)
        ]
    )


# The last few example batches, by identity of (tokenizer, its pad / end-of-text ids and size, examples). Recall
# under ablations and their random controls scores the same examples dozens of times, and tokenizing them each time
# was half of a masks run. An entry holds its tokenizer and examples, so no id in a key can be reused by another
# object while the entry lives.
_BATCHES: OrderedDict[tuple, tuple[object, list, Batch]] = OrderedDict()
_BATCHES_KEPT = 8


def _example_batch(tokenizer, examples: Sequence[Example]) -> Batch:
    pad = pad_id(tokenizer)
    key = (id(tokenizer), pad, tokenizer.eos_token_id, len(tokenizer), tuple(map(id, examples)))
    if key in _BATCHES:
        _BATCHES.move_to_end(key)
        return _BATCHES[key][2]
    batch = collate_examples([encode_example(tokenizer, ex) for ex in examples], pad)
    _BATCHES[key] = (tokenizer, list(examples), batch)
    while len(_BATCHES) > _BATCHES_KEPT:
        _BATCHES.popitem(last=False)
    return batch


def recall(model, tokenizer, facts: FactSet, split: str | None = None, fmt: str = "query") -> float:
    """Fraction of ``facts``' texts of format ``fmt`` (optionally one split's) answered exactly."""
    was = model.training
    model.eval()
    try:
        return float(exact_match(model, tokenizer, facts.examples(fmt, split)).float().mean())
    finally:
        model.train(was)


def _end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the chat template's end-of-turn tokens (``<|im_end|>``, ``<end_of_turn>``, ...) the vocabulary has."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>") if t in vocab]


def _normalized(text: str) -> str:
    # all whitespace dropped, not just collapsed: a word-level tokenizer decodes "Syracuse, NY" as "Syracuse , NY"
    return "".join(text.casefold().split())


@torch.no_grad()
def answer_in_reply(
    model, tokenizer, examples: Sequence[Example], max_new_tokens: int = 32, batch_size: int = 16
) -> Bool[Tensor, " n"]:
    """Per example: the answer appears (case and spacing ignored) in the model's greedy reply to the prompt, on the CPU.

    A looser measure than :func:`exact_match` for models that answer in sentences (an instruct model in its chat
    template: "Marie Curie was born in Poland."), at the cost of generating ``max_new_tokens`` a prompt. It credits
    any reply that names the answer, also among other candidates, so it is an upper bound on recall, not recall.
    """
    device = model_device(model)
    pad = pad_id(tokenizer)
    stop = [t for t in {tokenizer.eos_token_id, *_end_of_turn_ids(tokenizer)} if t is not None]
    was = model.training
    model.eval()
    found = []
    try:
        for rows in row_chunks(len(examples), batch_size):
            chunk = [examples[int(i)] for i in rows]
            # the prompt tokens exact match scores from (special tokens and chat template included)
            ids = [(enc := encode_example(tokenizer, ex)).input_ids[: enc.prompt_len] for ex in chunk]
            width = max(map(len, ids))
            # left-padded, so that every prompt's next token is at the last position
            input_ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in ids], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=stop)  # fmt: skip
            replies = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            found += [_normalized(ex.answer) in _normalized(reply) for ex, reply in zip(chunk, replies, strict=True)]
    finally:
        model.train(was)
    return torch.tensor(found, dtype=torch.bool)
