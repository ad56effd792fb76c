"""Consistency-aware objectives: an explicit cross-format alignment term added to a stage's query-format loss.

The measured mechanism (findings 1-4) says that mixed training generalises because the two formats of a fact come
to share representations and parameter updates. This module makes that pressure explicit. With a stage's
``align_weight`` > 0, each trained QA example's hidden states at the answer-predicting token (the last prompt token,
every layer in ``align_layers``; default all block outputs) are pulled towards a *teacher*: the storage-format
states of the same fact at its answer-predicting token in the person's first biography.

``align_teacher`` says which model provides those states:

- ``"stage_start"``: the model as the stage began, frozen (in two-stage training, stage 2's teacher is the stage-1
  model, whose data were the biographies: no biography is trained on in stage 2, so the two-stage constraint of no
  joint training holds). Computed once and kept in the trainer state, so a resumed stage has the same teacher.
- ``"live"``: the model being trained, on the same facts' biography prefixes, without gradient (for mixed training,
  where the biographies are trained on anyway). One extra forward of the prefixes per step.

The term is ``mean over examples and layers of (1 - cos(query state, teacher state))`` (``align_loss="cosine"``),
the mean squared difference (``"mse"``), or an InfoNCE loss that asks each query state to be nearer its own fact's
teacher state than the other facts' of the batch (``"contrastive"``: the same-minus-mismatched margin that
representation consistency measures); it is added to the query loss times ``align_weight`` and logged as
``loss_align``. Only the trained half's facts are used (the held-out people are never seen).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechrecall.tokenization import Batch, collate_examples, encode_example

__all__ = [
    "AlignData",
    "alignment_distance",
    "alignment_term",
    "default_layers",
    "hidden_at",
    "prompt_end",
    "teacher_states",
]


def prompt_end(batch: Batch) -> Int[Tensor, " batch"]:
    """Per row, the answer-predicting position: the one before the first scored (answer) token."""
    scored = batch.labels != -100
    first = torch.where(scored.any(1), scored.int().argmax(1), torch.zeros(len(batch), dtype=torch.long))
    return first - 1


def hidden_at(
    hidden_states: Sequence[Tensor], positions: Int[Tensor, " batch"], layers: Sequence[int]
) -> Float[Tensor, "batch layer d"]:
    """States ``hidden_states[l][row, positions[row]]`` for each ``l`` in ``layers`` (``hidden_states`` as a Hugging
    Face forward returns them with ``output_hidden_states=True``: the embeddings first, then each block's output)."""
    rows = torch.arange(len(positions), device=positions.device)
    return torch.stack([hidden_states[lay][rows, positions] for lay in layers], 1)


def default_layers(model) -> list[int]:
    from mechrecall.arch import n_layers

    return list(range(1, n_layers(model) + 1))


@dataclass
class AlignData:
    """The trained facts' storage-format prompts (biography prefixes ending at the value) and, per QA row of the
    training data, which of them is its fact."""

    storage: Batch
    storage_end: Int[Tensor, " facts"]
    query_fact: Int[Tensor, " rows"]

    @classmethod
    def build(cls, dataset, tokenizer) -> AlignData:
        from mechrecall.lab.bios import ATTRIBUTES

        pids = dataset.pids("train")
        storage = collate_examples([encode_example(tokenizer, ex) for ex in dataset.storage_examples(pids)],
                                   tokenizer.pad_token_id)  # fmt: skip
        # TrainingData's QA rows are dataset.query_examples(train pids): person, attribute, then template
        per_fact = dataset.spec.n_query_templates
        n_rows = len(pids) * len(ATTRIBUTES) * per_fact
        return cls(storage, prompt_end(storage), torch.arange(n_rows) // per_fact)


@torch.no_grad()
def teacher_states(model, align: AlignData, layers: Sequence[int], rows: Tensor | None = None, batch_size: int = 64):
    """Storage-format states of the facts ``rows`` (all by default) at their answer-predicting token, in float32."""
    from mechrecall.devices import model_device

    device = model_device(model)
    rows = torch.arange(len(align.storage)) if rows is None else rows
    out = []
    was = model.training
    model.eval()
    for chunk in rows.split(batch_size):
        sub = align.storage.index(chunk).to(device)
        hs = model(input_ids=sub.input_ids, attention_mask=sub.attention_mask, output_hidden_states=True).hidden_states
        out.append(hidden_at(hs, align.storage_end[chunk].to(device), layers).float())
    model.train(was)
    return torch.cat(out)


CONTRASTIVE_TEMPERATURE = 0.1


def alignment_term(
    query_states: Float[Tensor, "batch layer d"],
    teacher: Float[Tensor, "batch layer d"],
    kind: str = "cosine",
    facts: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, ""]:
    """Distance between query-format and teacher states, averaged over rows and layers.

    ``cosine``: ``1 - cos``; ``mse``: squared error; ``contrastive``: InfoNCE over the batch (each query state must be
    closer, in cosine at temperature :data:`CONTRASTIVE_TEMPERATURE`, to its own fact's teacher state than to the
    other facts' in the batch): the *margin* over mismatched facts, which is what representation consistency
    measures, rather than the distance alone. Rows of the same fact (``facts``: each row's fact id; other templates)
    are not each other's negatives; without ``facts`` every row is its own fact. The contrastive term needs at least
    two facts in the batch (with one it is 0 and teaches nothing)."""
    q, t = query_states.float(), teacher.to(query_states.device).float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(q, t, dim=-1)).mean()
    if kind == "mse":
        return ((q - t) ** 2).mean()
    if kind == "contrastive":
        qn, tn = F.normalize(q, dim=-1).transpose(0, 1), F.normalize(t, dim=-1).transpose(0, 1)  # layer batch d
        logits = qn @ tn.transpose(1, 2) / CONTRASTIVE_TEMPERATURE  # layer, query row, teacher row
        eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
        ids = facts.to(t.device) if facts is not None else torch.arange(len(t), device=t.device)
        same = ids[:, None] == ids[None]  # rows of one fact
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        target = torch.arange(len(t), device=t.device).expand(logits.shape[0], -1)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())
    raise ValueError(f"align_loss {kind!r}: choose cosine, mse or contrastive")


@torch.no_grad()
def alignment_distance(
    model, tokenizer, dataset, teacher: Tensor, layers: Sequence[int], kind: str = "cosine"
) -> float:
    """The alignment term over all trained QA rows (every template, as training sees them) against ``teacher`` (one
    row per fact): what the objective lowers, measured on a checkpoint (``contrastive``: against every other trained
    fact at once, so its scale is that of a batch of all rows, not of a training batch)."""
    from mechrecall.devices import model_device

    align = AlignData.build(dataset, tokenizer)
    examples = dataset.query_examples(dataset.pids("train"))
    batch = collate_examples([encode_example(tokenizer, ex) for ex in examples], tokenizer.pad_token_id)
    device = model_device(model)
    was = model.training
    model.eval()
    b = batch.to(device)
    hs = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states
    states = hidden_at(hs, prompt_end(b), layers)
    model.train(was)
    return float(alignment_term(states, teacher[align.query_fact].to(device), kind, align.query_fact))
