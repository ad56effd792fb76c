"""Patching inputs from facts: prompts cut before the answer, role positions from tokenizer offsets, pairings.

:func:`fact_inputs` turns examples of one format into :class:`PatchInputs` (prompt = text before the answer, the
last token of each requested role, readout = last prompt token, answer = first answer token). :func:`fact_pairs`
builds a (base, source) experiment over the facts of some people:

- ``cross_fact`` (default): row ``b`` pairs the ``source_format`` prompt of person A with the ``base_format`` prompt
  of another person B for the same attribute; the metric's answer is A's value and its foil B's, so a positive
  logit difference after a patch means the base prompt now answers with the source's fact;
- ``same_fact``: both sides are the same person (e.g. storage -> query of one fact); the foil is another person's
  value for that attribute.

Pairs whose two answers share their first token are skipped (the logit difference would be 0 by construction).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from mechrecall.facts import ATTRIBUTES, Example, FactDataset
from mechrecall.patching.core import PatchInputs
from mechrecall.tokenization import RoleAlignmentError, encode_example

DEFAULT_ROLES = ("subject", "relation", "final")
FORMATS = ("storage", "query")


def _encode(tokenizer, ex: Example, roles: Sequence[str]):
    enc = encode_example(tokenizer, ex)
    try:
        positions = [enc.last(r) for r in roles]
    except RoleAlignmentError as e:
        raise RoleAlignmentError(f"{e} (person {ex.person_id}, attribute {ex.attribute}, {ex.format} format)") from None
    return enc, positions


def fact_inputs(
    tokenizer, examples: Sequence[Example], *, roles: Sequence[str] = DEFAULT_ROLES, foils: Sequence[int] | None = None
) -> PatchInputs:
    """:class:`PatchInputs` for ``examples`` (answer = each example's first answer token; ``foils`` token ids)."""
    if not examples:
        raise ValueError("no examples to patch")
    encs = [_encode(tokenizer, ex, roles) for ex in examples]
    width = max(e.prompt_len for e, _ in encs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(encs), width), pad, dtype=torch.long)
    for i, (e, _) in enumerate(encs):
        ids[i, : e.prompt_len] = torch.tensor(e.input_ids[: e.prompt_len])
    answer = torch.tensor([e.input_ids[e.prompt_len] for e, _ in encs])
    return PatchInputs(
        input_ids=ids,
        positions=torch.tensor([p for _, p in encs], dtype=torch.long),
        readout=torch.tensor([e.prompt_len - 1 for e, _ in encs]),
        answer=answer,
        foil=answer.clone() if foils is None else torch.as_tensor(foils, dtype=torch.long),
        pos_labels=list(roles),
        subject_positions=[list(e.roles["subject"]) for e, _ in encs],
    )


def _example(dataset: FactDataset, pid: int, attribute: str, fmt: str) -> Example:
    if fmt == "storage":
        return dataset.bios[pid][0].facts[attribute]
    if fmt == "query":
        return dataset.query_examples([pid], templates=[0])[ATTRIBUTES.index(attribute)]
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def _first_answer_token(tokenizer, ex: Example) -> int:
    enc = encode_example(tokenizer, ex)
    return enc.input_ids[enc.prompt_len]


def fact_pairs(
    dataset: FactDataset,
    tokenizer,
    pids: Sequence[int],
    *,
    source_format: str = "storage",
    base_format: str = "query",
    mode: str = "cross_fact",
    attributes: Sequence[str] = ATTRIBUTES,
    n: int | None = None,
    roles: Sequence[str] = DEFAULT_ROLES,
    seed: int = 0,
) -> tuple[PatchInputs, PatchInputs, list[dict]]:
    """(base, source, rows) for patching ``source_format`` prompts into ``base_format`` prompts of ``pids``' facts.

    ``rows`` describes each pair (source person, base person, attribute) for the results table.
    """
    if mode not in ("cross_fact", "same_fact"):
        raise ValueError(f"unknown pairing mode {mode!r}; expected 'cross_fact' or 'same_fact'")
    if len(pids) < 2:
        raise ValueError("need at least two people to pair facts")
    rng = random.Random(seed)
    pids = list(pids)
    src_ex, base_ex, answers, foils, rows = [], [], [], [], []
    for attribute in attributes:
        order = pids[:]
        rng.shuffle(order)
        for i, a in enumerate(order):
            b = order[(i + 1) % len(order)]  # a fixed-point-free pairing within the attribute
            s = _example(dataset, a, attribute, source_format)
            t = _example(dataset, a if mode == "same_fact" else b, attribute, base_format)
            ans_a = _first_answer_token(tokenizer, s)
            ans_b = _first_answer_token(tokenizer, _example(dataset, b, attribute, base_format))
            if ans_a == ans_b:
                continue
            src_ex.append(s)
            base_ex.append(t)
            answers.append(ans_a)
            foils.append(ans_b)
            rows.append({"source_person": a, "base_person": a if mode == "same_fact" else b, "attribute": attribute})
    keep = list(range(len(rows)))
    rng.shuffle(keep)
    keep = sorted(keep[:n]) if n is not None else keep[: len(rows)]
    keep = sorted(keep)
    src_ex, base_ex = [src_ex[i] for i in keep], [base_ex[i] for i in keep]
    answers, foils, rows = [answers[i] for i in keep], [foils[i] for i in keep], [rows[i] for i in keep]
    source = fact_inputs(tokenizer, src_ex, roles=roles, foils=foils)
    base = fact_inputs(tokenizer, base_ex, roles=roles, foils=foils)
    base.answer = torch.tensor(answers)  # the source's fact is what a successful patch makes the base say
    return base, source, rows
