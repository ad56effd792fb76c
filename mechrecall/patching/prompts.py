"""Patching inputs from facts: prompts cut before the answer, role positions from tokenizer offsets, pairings.

:func:`fact_inputs` turns examples of one format into :class:`PatchInputs` (prompt = text before the answer, the
last token of each requested role, readout = last prompt token, answer = first answer token). :func:`fact_pairs`
builds a (base, source) experiment over a :class:`mechrecall.facts.FactSet`:

- ``cross_fact`` (default): row ``b`` pairs the ``source_format`` prompt of fact A with the ``base_format`` prompt
  of another fact B of the same relation (another subject); the metric's answer is A's value and its foil B's, so a
  positive logit difference after a patch means the base prompt now answers with the source's fact;
- ``same_fact``: both sides are the same fact (e.g. storage -> query of one fact); the foil is another fact's
  answer for that relation.

Pairs whose two answers share their first token are skipped (the logit difference would be 0 by construction).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from mechrecall.facts import FORMATS, Example, FactSet
from mechrecall.patching.core import PatchInputs
from mechrecall.tokenization import RoleAlignmentError, encode_example

DEFAULT_ROLES = ("subject", "relation", "final")


def _encode(tokenizer, ex: Example, roles: Sequence[str]):
    enc = encode_example(tokenizer, ex)
    try:
        positions = [enc.last(r) for r in roles]
    except RoleAlignmentError as e:
        raise RoleAlignmentError(f"{e} (fact {ex.subject_id}/{ex.relation}, {ex.format} format)") from None
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


def _first_answer_token(tokenizer, ex: Example) -> int:
    enc = encode_example(tokenizer, ex)
    return enc.input_ids[enc.prompt_len]


def fact_pairs(
    facts: FactSet,
    tokenizer,
    *,
    source_format: str = "storage",
    base_format: str = "query",
    mode: str = "cross_fact",
    relations: Sequence[str] | None = None,
    n: int | None = None,
    roles: Sequence[str] = DEFAULT_ROLES,
    seed: int = 0,
) -> tuple[PatchInputs, PatchInputs, list[dict]]:
    """(base, source, rows) for patching ``source_format`` prompts into ``base_format`` prompts of ``facts``.

    Facts are paired within each relation (``relations``: default all, in order of first appearance), by a seeded
    fixed-point-free shuffle; each side uses the fact's first text of its format. ``rows`` describes each pair
    (source fact, base fact, relation) for the results table.
    """
    if mode not in ("cross_fact", "same_fact"):
        raise ValueError(f"unknown pairing mode {mode!r}; expected 'cross_fact' or 'same_fact'")
    for fmt in (source_format, base_format):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    rng = random.Random(seed)
    src_ex, base_ex, answers, foils, rows = [], [], [], [], []
    for relation in facts.relations if relations is None else relations:
        group = [f for f in facts if f.relation == relation and f.texts(source_format) and f.texts(base_format)]
        if len(group) < 2:
            raise ValueError(f"relation {relation!r}: need at least two facts with both formats to pair")
        rng.shuffle(group)
        for i, a in enumerate(group):
            b = group[(i + 1) % len(group)]  # a fixed-point-free pairing within the relation
            s = a.texts(source_format)[0]
            t = (a if mode == "same_fact" else b).texts(base_format)[0]
            ans_a = _first_answer_token(tokenizer, s)
            ans_b = _first_answer_token(tokenizer, b.texts(base_format)[0])
            if ans_a == ans_b:
                continue
            src_ex.append(s)
            base_ex.append(t)
            answers.append(ans_a)
            foils.append(ans_b)
            rows.append({"source_fact": a.id, "base_fact": a.id if mode == "same_fact" else b.id, "relation": relation})
    if not rows:
        raise ValueError("no pair of facts has answers that differ in their first token")
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
