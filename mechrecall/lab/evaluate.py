"""The lab's recall table: exact match in both formats, per person split and per attribute.

Scoring is the toolkit's teacher-forced greedy exact match (:mod:`mechrecall.recall`). Storage recall is scored
inside each whole biography in one forward (causal attention makes the prediction at a position depend on the
prefix only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechrecall.devices import model_device
from mechrecall.facts import Example
from mechrecall.lab.bios import ATTRIBUTES, SPLITS, Biography, FactDataset, Split
from mechrecall.recall import answer_scores, correct_answers, row_chunks
from mechrecall.tokenization import collate


@dataclass
class Recall:
    """Per-example exact match for a list of facts in one format."""

    format: str
    person_ids: Int[Tensor, " n"]
    attributes: list[str]
    splits: list[str]
    correct: Bool[Tensor, " n"]
    nll: Float[Tensor, " n"] | None = None  # the answer's teacher-forced negative log-likelihood (query format)

    def _keep(self, split: Split | None, attribute: str | None) -> Tensor:
        return torch.tensor(
            [
                (split is None or s == split) and (attribute is None or a == attribute)
                for s, a in zip(self.splits, self.attributes)
            ],
            dtype=torch.bool,
        )

    def accuracy(self, split: Split | None = None, attribute: str | None = None) -> float:
        keep = self._keep(split, attribute)
        return float(self.correct[keep].float().mean()) if keep.any() else float("nan")

    def mean_nll(self, split: Split | None = None, attribute: str | None = None) -> float:
        """Mean answer negative log-likelihood (nats per question) of a split: NaN without scores or examples."""
        keep = self._keep(split, attribute)
        return float(self.nll[keep].mean()) if self.nll is not None and keep.any() else float("nan")

    def per_attribute(self, split: Split | None = None) -> dict[str, float]:
        return {a: self.accuracy(split, a) for a in ATTRIBUTES}

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "format": self.format,
                "person_id": self.person_ids.tolist(),
                "attribute": self.attributes,
                "split": self.splits,
                "correct": self.correct.tolist(),
            }
        )


def query_recall(model, tokenizer, dataset: FactDataset, examples: Sequence[Example], batch_size: int = 512) -> Recall:
    scores = answer_scores(model, tokenizer, examples, batch_size)
    return Recall(
        "query",
        torch.tensor([ex.subject_id for ex in examples]),
        [ex.relation for ex in examples],
        [dataset.split[ex.subject_id] for ex in examples],
        scores.correct,
        scores.nll,
    )


def encode_biography(tokenizer, bio: Biography) -> tuple[list[int], dict[str, list[int]]]:
    """Token ids of a whole biography and, per attribute, the positions of its value's tokens."""
    enc = tokenizer(bio.text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    positions = {}
    for attribute, ex in bio.facts.items():
        s, e = ex.spans["answer"][0]
        positions[attribute] = [i for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s]
    return list(enc["input_ids"]), positions


def storage_recall(
    model, tokenizer, dataset: FactDataset, pids: Sequence[int] | None = None, batch_size: int = 256
) -> Recall:
    """Exact match of every attribute value inside each person's first biography (teacher-forced)."""
    pids = list(range(len(dataset.people))) if pids is None else list(pids)
    encoded = [encode_biography(tokenizer, dataset.bios[p][0]) for p in pids]
    all_scored = [sorted(i for ps in pos.values() for i in ps) for _, pos in encoded]
    batch = collate([ids for ids, _ in encoded], all_scored, tokenizer.pad_token_id)
    correct, person_ids, attributes = [], [], []
    for rows in row_chunks(len(batch), batch_size):
        sub = batch.index(rows)
        hits = correct_answers(model, sub.to(model_device(model))).cpu()
        for r, row in enumerate(rows.tolist()):
            for attribute in ATTRIBUTES:
                correct.append(bool(hits[r, encoded[row][1][attribute]].all()))
                person_ids.append(pids[row])
                attributes.append(attribute)
    return Recall(
        "storage", torch.tensor(person_ids), attributes, [dataset.split[p] for p in person_ids], torch.tensor(correct)
    )


def evaluate(model, tokenizer, dataset: FactDataset, splits: Sequence[Split] = SPLITS, storage: bool = True) -> dict:
    """Summary fractions: ``{split}_qa`` for each split (``trained_qa`` for ``train``), ``storage``, per attribute;
    and ``{split}_qa_nll``, the mean answer negative log-likelihood of a split's questions (nats)."""
    was_training = model.training
    model.eval()
    pids = dataset.pids(splits)
    out: dict = {}
    names = {"train": "trained_qa", "validation": "validation_qa", "heldout": "heldout_qa"}
    per_attribute = {}
    if pids:
        qa = query_recall(model, tokenizer, dataset, dataset.query_examples(pids))
        for split in splits:
            out[names[split]] = qa.accuracy(split)
            out[f"{names[split]}_nll"] = qa.mean_nll(split)
            per_attribute[names[split]] = qa.per_attribute(split)
    if storage:
        st = storage_recall(model, tokenizer, dataset)
        out["storage"] = st.accuracy()
        per_attribute["storage"] = st.per_attribute()
    out["per_attribute"] = per_attribute
    model.train(was_training)
    return out
