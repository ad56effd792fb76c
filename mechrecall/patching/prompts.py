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
from mechrecall.tokenization import RoleAlignmentError, encode_example, pad_id

__all__ = [
    "FORMATS",
    "DEFAULT_ROLES",
    "fact_inputs",
    "fact_pairs",
    "patch_roles",
]

DEFAULT_ROLES = ("subject", "relation", "final")


def _encode(tokenizer, ex: Example, roles: Sequence[str]):
    enc = encode_example(tokenizer, ex)
    try:
        positions = [enc.last(r) for r in roles]
    except RoleAlignmentError as e:
        raise RoleAlignmentError(f"{e} (fact {ex.subject_id}/{ex.relation}, {ex.format} format)") from None
    return enc, positions


def _padded(seqs: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(q) for q in seqs)), fill, dtype=torch.long)
    for i, q in enumerate(seqs):
        out[i, : len(q)] = torch.tensor(list(q), dtype=torch.long)
    return out


def fact_inputs(
    tokenizer,
    examples: Sequence[Example],
    *,
    roles: Sequence[str] = DEFAULT_ROLES,
    foils: Sequence[int] | None = None,
    whole_answer: bool = False,
    answers: Sequence[Sequence[int]] | None = None,
    foil_answers: Sequence[Sequence[int]] | None = None,
) -> PatchInputs:
    """:class:`PatchInputs` for ``examples`` (answer = each example's first answer token; ``foils`` token ids).

    ``whole_answer=True`` also fills ``answer_ids`` / ``foil_ids`` for the whole-answer metrics and appends the
    answer to each prompt, teacher-forced: each example's own answer tokens, or ``answers[i]`` (e.g. another fact's
    answer, for cross-fact patching); ``foil_answers`` default to the same.
    """
    if not examples:
        raise ValueError("no examples to patch")
    encs = [_encode(tokenizer, ex, roles) for ex in examples]
    pad = pad_id(tokenizer)
    prompts = [e.input_ids[: e.prompt_len] for e, _ in encs]
    answer = torch.tensor([e.input_ids[e.prompt_len] for e, _ in encs])
    extra: dict = {}
    if whole_answer:
        full = [_answer_tokens(e) for e, _ in encs] if answers is None else [list(a) for a in answers]
        if len(full) != len(encs) or any(not a for a in full):
            raise ValueError("answers: need one non-empty token list per example")
        extra["answer_ids"] = _padded(full, -1)
        extra["foil_ids"] = extra["answer_ids"].clone() if foil_answers is None else _padded(foil_answers, -1)
        prompts = [(*p, *a) for p, a in zip(prompts, full)]  # teacher-forced: token k is read at readout + k
    return PatchInputs(
        input_ids=_padded(prompts, pad),
        positions=torch.tensor([p for _, p in encs], dtype=torch.long),
        readout=torch.tensor([e.prompt_len - 1 for e, _ in encs]),
        answer=answer,
        foil=answer.clone() if foils is None else torch.as_tensor(foils, dtype=torch.long),
        pos_labels=list(roles),
        subject_positions=[list(e.roles["subject"]) for e, _ in encs],
        **extra,
    )


def _answer_tokens(enc) -> list[int]:
    """The answer's token ids as the example's own text tokenizes them (no end-of-text)."""
    return [enc.input_ids[i] for i in enc.roles["answer"]]


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
    whole_answer: bool = False,
    stats: dict | None = None,
) -> tuple[PatchInputs, PatchInputs, list[dict]]:
    """(base, source, rows) for patching ``source_format`` prompts into ``base_format`` prompts of ``facts``.

    Facts are paired within each relation (``relations``: default all, in order of first appearance), by a seeded
    fixed-point-free shuffle; each side uses the fact's first text of its format. ``rows`` describes each pair
    (source fact, base fact, relation) for the results table. ``whole_answer=True`` adds the whole answers for the
    whole-answer metrics: the base prompt is followed by the *source* fact's answer (as the base format tokenizes
    it), which a successful patch makes likely; its foil is the base fact's own answer.

    Pairs whose two answers begin with the same token are dropped (the first-token metrics, ``logit_diff`` and
    ``hit``, cannot tell them apart), and at most ``n`` pairs are kept (a seeded sample). ``stats``, if given, is filled
    with the counts: ``candidates`` (pairs formed), ``same_first_token`` (dropped), ``available`` and ``kept``.
    """
    if mode not in ("cross_fact", "same_fact"):
        raise ValueError(f"unknown pairing mode {mode!r}; expected 'cross_fact' or 'same_fact'")
    for fmt in (source_format, base_format):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    rng = random.Random(seed)
    candidates = 0
    src_ex, base_ex, answers, foils, rows, whole, whole_foil, src_foil = [], [], [], [], [], [], [], []
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
            candidates += 1
            if ans_a == ans_b:
                continue
            src_ex.append(s)
            base_ex.append(t)
            answers.append(ans_a)
            foils.append(ans_b)
            if whole_answer:
                whole.append(_answer_tokens(encode_example(tokenizer, a.texts(base_format)[0])))
                whole_foil.append(_answer_tokens(encode_example(tokenizer, b.texts(base_format)[0])))
                src_foil.append(_answer_tokens(encode_example(tokenizer, b.texts(source_format)[0])))
            rows.append({"source_fact": a.id, "base_fact": a.id if mode == "same_fact" else b.id, "relation": relation})
    if not rows:
        raise ValueError("no pair of facts has answers that differ in their first token")
    if stats is not None:
        kept = len(rows) if n is None else min(n, len(rows))
        stats.update(candidates=candidates, same_first_token=candidates - len(rows), available=len(rows), kept=kept)
    keep = list(range(len(rows)))
    rng.shuffle(keep)
    keep = sorted(keep[:n]) if n is not None else keep[: len(rows)]
    keep = sorted(keep)
    src_ex, base_ex = [src_ex[i] for i in keep], [base_ex[i] for i in keep]
    answers, foils, rows = [answers[i] for i in keep], [foils[i] for i in keep], [rows[i] for i in keep]
    source = fact_inputs(tokenizer, src_ex, roles=roles, foils=foils, whole_answer=whole_answer,
                         foil_answers=[src_foil[i] for i in keep] if whole_answer else None)  # fmt: skip
    base = fact_inputs(
        tokenizer, base_ex, roles=roles, foils=foils, whole_answer=whole_answer,
        answers=[whole[i] for i in keep] if whole_answer else None,
        foil_answers=[whole_foil[i] for i in keep] if whole_answer else None,
    )  # fmt: skip
    base.answer = torch.tensor(answers)  # the source's fact is what a successful patch makes the base say
    return base, source, rows


def patch_roles(facts: FactSet, formats=("storage", "query")) -> tuple[str, ...]:
    """The roles every first text of ``formats`` has: subject, relation (when located), final."""
    texts = [ex for fmt in formats for ex in facts.examples(fmt, templates=[0])]
    return tuple(r for r in DEFAULT_ROLES if r == "final" or all(ex.spans.get(r) for ex in texts))
