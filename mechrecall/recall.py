"""Exact-match recall of facts, teacher-forced: one forward per batch, equal to greedy decoding.

A text counts as recalled when the argmax at every answer token is right, and for the query format also at the
end-of-text token after it. That is exactly greedy exact match (greedy decoding emits the answer and stops iff each
of those argmaxes is right; ``tests/lab/test_evaluate.py`` checks this against ``generate``). Multi-token answers are
scored on every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from mechrecall.facts import Example, FactSet
from mechrecall.tokenization import Batch, collate_examples, encode_example

__all__ = ["correct_answers", "row_chunks", "exact_match", "recall"]


@torch.no_grad()
def correct_answers(model, batch: Batch) -> Bool[Tensor, "batch pos"]:
    """Per position: the scored token (``labels != -100``) is the argmax of the previous position's logits.

    Unscored positions are True, so ``.all(-1)`` over a row's positions is that row's exact match. For an architecture
    :mod:`mechrecall.arch` knows, the vocabulary logits are computed at the scored positions only (the decoder's
    final-normed states, then the unembedding): the full ``[batch, pos, vocab]`` logits of a 128k-vocabulary model
    would cost most of the forward's time and gigabytes of memory for a handful of answer tokens per row.
    """
    target = batch.labels[:, 1:]
    scored = target != -100
    out = torch.ones_like(batch.labels, dtype=torch.bool)
    inner = _known_architecture(model)
    if inner is None:  # any other callable returning .logits (a test's stand-in, a wrapped model)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        out[:, 1:] = (logits[:, :-1].argmax(-1) == target) | ~scored
        return out
    from mechrecall import arch

    normed = arch.base_model(inner)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows, cols = scored.nonzero(as_tuple=True)
    # (a model split over devices returns its states on the last one)
    picked = normed[rows.to(normed.device), cols.to(normed.device)]
    predicted = arch.normed_to_logits(inner, picked).argmax(-1).to(target.device)
    out[rows, cols + 1] = predicted == target[rows, cols]
    return out


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


def exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int = 512) -> Bool[Tensor, " n"]:
    """Per example: greedy exact match of its answer (and end-of-text for queries), on the CPU."""
    from mechrecall.devices import model_device

    encoded = [encode_example(tokenizer, ex) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate_examples(encoded, pad)
    device = model_device(model)
    out = []
    for rows in row_chunks(len(batch), batch_size):
        sub = batch.index(rows)
        out.append(correct_answers(model, sub.to(device)).all(-1).cpu())
    return torch.cat(out)


def recall(model, tokenizer, facts: FactSet, split: str | None = None, fmt: str = "query") -> float:
    """Fraction of ``facts``' texts of format ``fmt`` (optionally one split's) answered exactly."""
    was = model.training
    model.eval()
    try:
        return float(exact_match(model, tokenizer, facts.examples(fmt, split)).float().mean())
    finally:
        model.train(was)
