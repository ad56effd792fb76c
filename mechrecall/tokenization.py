"""Role spans resolved to token positions through offset mappings, and padded batches with label masks.

:func:`encode_example` works with any Hugging Face *fast* tokenizer (the lab's word-level one, or a pretrained
model's BPE with leading spaces), so the same role resolution serves every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from mechrecall.facts import FORMATS, ROLES, Example, FactSet

__all__ = [
    "check_tokenization",
    "RoleAlignmentError",
    "EncodedExample",
    "encode_example",
    "Batch",
    "collate",
    "collate_examples",
    "collate_documents",
    "pad_id",
]


class RoleAlignmentError(ValueError):
    """A role's character span does not land on whole tokens (the message names the prompt and the role)."""


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example and the positions of each role.

    ``answer_positions`` are the positions whose *token* is scored (the answer tokens, then end-of-text for query
    examples); the model predicts token ``i`` from position ``i - 1``. ``prompt_len`` is the index of the first answer
    token, so ``input_ids[:prompt_len]`` is the prompt and ``prompt_len - 1`` its last position.
    """

    example: Example
    input_ids: tuple[int, ...]
    roles: dict[str, tuple[int, ...]]
    answer_positions: tuple[int, ...]

    @property
    def prompt_len(self) -> int:
        return self.roles["answer"][0]

    def last(self, role: str) -> int:
        """Position of the role's last token; ``"final"`` is the last prompt token (it predicts the answer)."""
        if role == "final":
            return self.prompt_len - 1
        positions = self.roles.get(role, ())
        if not positions:
            raise RoleAlignmentError(f"role {role!r} has no tokens in prompt {self.example.prompt!r}")
        return positions[-1]


def encode_example(tokenizer, example: Example, *, add_eos: bool | None = None) -> EncodedExample:
    """Tokenize ``example.text`` and map each role's character spans to token positions.

    A token belongs to a role when its character range overlaps the role's span. Raises
    :class:`RoleAlignmentError` when a role that has text gets no token, or when a token straddles the boundary
    between prompt and answer (then the prompt cannot be cut at a token boundary).
    """
    add_eos = example.format == "query" if add_eos is None else add_eos
    enc = tokenizer(example.text, return_offsets_mapping=True, add_special_tokens=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    roles: dict[str, tuple[int, ...]] = {}
    for role in ROLES:
        spans = example.spans.get(role, ())
        pos = tuple(i for i, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans))
        if spans and not pos:
            raise RoleAlignmentError(f"role {role!r} of prompt {example.text!r} covers no token")
        roles[role] = pos
    a0, a1 = example.spans["answer"][0]
    answer = roles["answer"]
    if offsets[answer[0]][0] < a0 and example.text[offsets[answer[0]][0] : a0].strip():
        raise RoleAlignmentError(
            f"a token straddles the prompt/answer boundary in {example.text!r}: {example.text[offsets[answer[0]][0] : a1]!r}"
        )
    if answer[-1] != max(i for i, (a, b) in enumerate(offsets) if b > a):
        raise RoleAlignmentError(f"the answer of {example.text!r} is not the end of the text")
    scored = answer
    if add_eos:
        ids.append(tokenizer.eos_token_id)
        scored = (*answer, len(ids) - 1)
    return EncodedExample(example, tuple(ids), roles, scored)


@dataclass(frozen=True)
class Batch:
    """Right-padded token batch with a label mask: ``labels`` is -100 wherever no loss or score applies."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    labels: Int[Tensor, "batch pos"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> Batch:
        """The batch on ``device`` (the model's: inputs go where the model lives)."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def index(self, rows: Int[Tensor, " n"]) -> Batch:
        """A sub-batch, trimmed to its longest row."""
        width = int(self.attention_mask[rows].sum(1).max())
        return Batch(self.input_ids[rows, :width], self.attention_mask[rows, :width], self.labels[rows, :width])


def collate(sequences: list[list[int]], scored: list[list[int]], pad_id: int) -> Batch:
    """Pad ``sequences`` to one width; ``labels[i, j] = ids[i][j]`` for ``j`` in ``scored[i]``, else -100."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, (seq, pos) in enumerate(zip(sequences, scored, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, list(pos)] = ids[i, list(pos)]
    return Batch(ids, mask, labels)


def collate_examples(encoded: list[EncodedExample], pad_id: int) -> Batch:
    """Batch of examples scored on their answer positions (+ end-of-text for queries)."""
    return collate([list(e.input_ids) for e in encoded], [list(e.answer_positions) for e in encoded], pad_id)


def pad_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its end-of-text (many causal LMs define no pad;
    padded positions are masked, so which id fills them does not matter)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate_documents(tokenizer, texts: list[str]) -> Batch:
    """Language-modelling batch: every token after ``<bos>`` is scored, end-of-text appended."""
    seqs = [list(tokenizer(t)["input_ids"]) + [tokenizer.eos_token_id] for t in texts]
    return collate(seqs, [list(range(1, len(s))) for s in seqs], tokenizer.pad_token_id)


def check_tokenization(facts: FactSet, tokenizer, roles: Sequence[str] = ("subject",), model: str = "") -> FactSet:
    """``facts`` if every text tokenizes with ``tokenizer`` into whole-token roles and each of ``roles`` (``"final"``:
    the token before the answer) has a token; else the first failure as a :class:`RoleAlignmentError` naming the
    fact, the text and ``model``. Cheap: run it before an analysis so that a bad record fails before any model work."""
    for f in facts:
        for fmt in FORMATS:
            for i, ex in enumerate(f.texts(fmt)):
                try:
                    enc = encode_example(tokenizer, ex)
                    for role in roles:
                        enc.last(role)
                except RoleAlignmentError as e:
                    where = f" with the tokenizer of {model}" if model else ""
                    raise RoleAlignmentError(
                        f"{facts.source or 'facts'}: fact {f.id!r}, {fmt}[{i}]{where}: {e}"
                    ) from None
    return facts
