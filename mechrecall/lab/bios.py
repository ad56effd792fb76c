"""The lab's fact generator: synthetic people (bioS), their biographies and QA, as toolkit :mod:`mechrecall.facts` types.

A *fact* is (person, attribute, value). It is rendered in two formats:

- **storage** (a biography): six sentences, one per attribute, e.g. ``"Anya Forger was born in Princeton, NJ."``. The
  full name stands in the first sentence, later sentences use a pronoun (option ``fullname`` repeats the name).
- **query** (QA): ``"What is the birth city of Anya Forger?\\nAnswer: Princeton, NJ"``.

Every rendered example carries character spans per *role* (``subject``, ``relation``, ``answer``, and ``cue`` for the
QA's "Answer:"), recorded while the text is assembled, so nothing is found by string search afterwards. Token spans
come from the tokenizer's offset mapping (:func:`mechrecall.tokenization.encode_example`). Each text is a toolkit
:class:`mechrecall.facts.Example` (``subject_id`` = the person's id, ``relation`` = the attribute);
:meth:`FactDataset.factset` is the same facts as a toolkit :class:`mechrecall.facts.FactSet`.

People are split three ways: ``train`` (QA trained), ``validation`` (QA never trained; for any tuning) and
``heldout`` (QA never trained; reported). Biographies of everyone are trained in both regimes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mechrecall.facts import CharSpan, Example, Fact, FactSet
from mechrecall.io import atomic_write_text
from mechrecall.lab import pools

Split = Literal["train", "validation", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "validation", "heldout")
ATTRIBUTES: tuple[str, ...] = ("birth_date", "birth_city", "university", "major", "company", "company_city")
MONTHS = ("January February March April May June July August September October November December").split()

# Storage templates: "{subject}" then "{value}"; the value ends the sentence so a prefix of the biography is the
# storage-format prompt for that fact. "{poss}" is the person's possessive pronoun (part of the relation).
STORAGE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{subject} was born on {value}.",
        "{subject} came into this world on {value}.",
        "{subject} celebrates {poss} birthday on {value}.",
        "{subject} arrived on {value}.",
        "{subject} has a birth date of {value}.",
    ),
    "birth_city": (
        "{subject} was born in {value}.",
        "{subject} spent {poss} early years in {value}.",
        "{subject} was brought up in {value}.",
        "{subject} hails from {value}.",
        "{subject} grew up in {value}.",
    ),
    "university": (
        "{subject} studied at {value}.",
        "{subject} graduated from {value}.",
        "{subject} received {poss} degree from {value}.",
        "{subject} completed {poss} education at {value}.",
        "{subject} attended {value}.",
    ),
    "major": (
        "{subject} majored in {value}.",
        "{subject} focused {poss} studies on {value}.",
        "{subject} earned a degree in {value}.",
        "{subject} specialized in {value}.",
        "{subject} pursued {value}.",
    ),
    "company": (
        "{subject} worked at {value}.",
        "{subject} was employed by {value}.",
        "{subject} built {poss} career at {value}.",
        "{subject} held a job at {value}.",
        "{subject} joined {value}.",
    ),
    "company_city": (
        "{subject} worked in {value}.",
        "{subject} was based in {value}.",
        "{subject} commuted to an office in {value}.",
        "{subject} had {poss} workplace in {value}.",
        "{subject} relocated for work to {value}.",
    ),
}

QUERY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("What is the birth date of {subject}?", "When was {subject} born?"),
    "birth_city": ("What is the birth city of {subject}?", "Where was {subject} born?"),
    "university": ("Which university did {subject} study at?", "Where did {subject} go to university?"),
    "major": ("What major did {subject} study?", "What field did {subject} study?"),
    "company": ("Which company did {subject} work for?", "Who employed {subject}?"),
    "company_city": ("Where did {subject} work?", "In which city did {subject} work?"),
}
QUERY_CUE = "Answer:"
_PUNCT = ".,?!:;"


@dataclass(frozen=True)
class Person:
    pid: int
    name: str
    pronoun: str  # "He" / "She"
    attributes: dict[str, str]

    @property
    def possessive(self) -> str:
        return "his" if self.pronoun == "He" else "her"


@dataclass(frozen=True)
class Biography:
    """A full storage-format document and its per-attribute examples (each a prefix of ``text``)."""

    person_id: int
    text: str
    facts: dict[str, Example]


def _word_spans(text: str, start: int, end: int) -> list[CharSpan]:
    """The chunk text[start:end] without surrounding whitespace and punctuation, or nothing if only those remain."""
    while start < end and (text[start].isspace() or text[start] in _PUNCT):
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] in _PUNCT):
        end -= 1
    return [(start, end)] if end > start else []


def render(
    template: str, subject: str, value: str, poss: str, offset: int = 0
) -> tuple[str, dict[str, list[CharSpan]]]:
    """Fill a template and return (text, role spans) with spans shifted by ``offset``.

    The relation is every template word outside the subject and value slots (punctuation and spaces excluded).
    """
    template = template.replace("{poss}", poss)
    head, rest = template.split("{subject}")
    mid, tail = rest.split("{value}") if "{value}" in rest else (rest, "")
    text = head + subject + mid + value + tail if "{value}" in rest else head + subject + mid
    s0 = len(head)
    s1 = s0 + len(subject)
    spans: dict[str, list[CharSpan]] = {"subject": [(s0, s1)], "relation": _word_spans(text, 0, s0)}
    spans["relation"] += _word_spans(text, s1, s1 + len(mid))
    if "{value}" in rest:
        v0 = s1 + len(mid)
        spans["answer"] = [(v0, v0 + len(value))]
        spans["relation"] += _word_spans(text, v0 + len(value), len(text))
    shifted = {role: [(a + offset, b + offset) for a, b in ss] for role, ss in spans.items()}
    return text, shifted


def query_example(person: Person, attribute: str, template: int = 0) -> Example:
    """The QA form: ``"{question}\\nAnswer: {value}"`` (the loss and the score cover the value and end-of-text)."""
    question, spans = render(QUERY_TEMPLATES[attribute][template], person.name, "", person.possessive)
    cue_start = len(question) + 1
    text = f"{question}\n{QUERY_CUE} {person.attributes[attribute]}"
    answer_start = cue_start + len(QUERY_CUE) + 1
    roles = {
        "subject": tuple(spans["subject"]),
        "relation": tuple(spans["relation"]),
        "cue": ((cue_start, cue_start + len(QUERY_CUE)),),
        "answer": ((answer_start, len(text)),),
    }
    return Example(person.pid, attribute, "query", text, roles, template)


def biography(
    person: Person,
    rng: random.Random,
    n_templates: int,
    *,
    permute: bool = False,
    fullname: bool = False,
    document: int = 0,
) -> Biography:
    """One biography: a sentence per attribute with a template drawn from the first ``n_templates``.

    ``permute`` shuffles the sentence order (the full name stays in the first sentence); ``fullname`` uses the name in
    every sentence instead of the pronoun.
    """
    order = list(ATTRIBUTES)
    if permute:
        rng.shuffle(order)
    text = ""
    facts: dict[str, Example] = {}
    for i, attribute in enumerate(order):
        t = rng.randrange(n_templates)
        subject = person.name if (i == 0 or fullname) else person.pronoun
        offset = len(text) + (1 if text else 0)
        sentence, spans = render(
            STORAGE_TEMPLATES[attribute][t], subject, person.attributes[attribute], person.possessive, offset
        )
        text = f"{text} {sentence}" if text else sentence
        end = spans["answer"][0][1]
        roles = {role: tuple(s for s in spans[role] if s[1] <= end) for role in ("subject", "relation", "answer")}
        roles["cue"] = ()
        facts[attribute] = Example(person.pid, attribute, "storage", text[:end], roles, t, document)
    return Biography(person.pid, text, facts)


@dataclass(frozen=True)
class DataSpec:
    """What :func:`generate` needs; mirrored by the validated ``DataConfig`` in :mod:`mechrecall.lab.config`."""

    n_people: int = 500
    name_style: Literal["single_token", "multi_token"] = "single_token"
    n_storage_templates: int = 5
    n_query_templates: int = 1
    bios_per_person: int = 1
    permute: bool = False
    fullname: bool = False
    train_fraction: float = 0.5
    validation_fraction: float = 0.1


@dataclass
class FactDataset:
    """People, their biographies and the person split; the single source of every example."""

    spec: DataSpec
    seed: int
    people: list[Person]
    bios: list[list[Biography]]  # [person][copy]
    split: dict[int, Split]
    _hash: str = field(default="", repr=False)

    def pids(self, split: Split | Iterable[Split]) -> list[int]:
        wanted = {split} if isinstance(split, str) else set(split)
        return [p.pid for p in self.people if self.split[p.pid] in wanted]

    def storage_examples(self, pids: Sequence[int] | None = None) -> list[Example]:
        """Per-fact storage prompts cut from each person's first biography."""
        pids = range(len(self.people)) if pids is None else pids
        return [self.bios[p][0].facts[a] for p in pids for a in ATTRIBUTES]

    def query_examples(
        self, pids: Sequence[int] | None = None, templates: Sequence[int] | None = None
    ) -> list[Example]:
        pids = range(len(self.people)) if pids is None else pids
        templates = range(self.spec.n_query_templates) if templates is None else templates
        return [query_example(self.people[p], a, t) for p in pids for a in ATTRIBUTES for t in templates]

    def documents(self) -> list[str]:
        """Every biography text (all people, all copies): the storage-format training corpus."""
        return [b.text for copies in self.bios for b in copies]

    def corpus(self) -> Iterator[str]:
        """All texts either format can produce, for training a tokenizer."""
        yield from self.documents()
        for a in ATTRIBUTES:
            for t in range(len(QUERY_TEMPLATES[a])):
                for p in self.people:
                    yield query_example(p, a, t).text

    @property
    def hash(self) -> str:
        """Content hash of people, biographies and split (identifies the dataset in the checkpoint registry)."""
        if not self._hash:
            h = hashlib.sha256()
            for p in self.people:
                h.update(json.dumps([asdict(p), self.split[p.pid], [b.text for b in self.bios[p.pid]]]).encode())
            self._hash = h.hexdigest()[:16]
        return self._hash

    def factset(self, pids: Sequence[int] | None = None) -> FactSet:
        """These people's facts as a toolkit :class:`FactSet` (storage: the first biography; query: every template)."""
        pids = range(len(self.people)) if pids is None else pids
        facts = []
        for p in pids:
            person = self.people[p]
            for a in ATTRIBUTES:
                query = tuple(query_example(person, a, t) for t in range(self.spec.n_query_templates))
                storage = (self.bios[p][0].facts[a],)
                facts.append(Fact(f"{p}/{a}", person.name, a, person.attributes[a], storage, query, self.split[p]))
        return FactSet(facts, f"lab dataset {self.hash}")

    def to_records(self) -> list[dict]:
        """One JSON-able record per example (both formats, every person), with role spans and the person's split."""
        records = []
        for p in self.people:
            for ex in [*self.bios[p.pid][0].facts.values(), *self.query_examples([p.pid])]:
                records.append({**asdict(ex), "split": self.split[p.pid], "name": p.name})
        return records

    def to_jsonl(self, path: str | Path) -> Path:
        lines = "\n".join(json.dumps(r) for r in self.to_records())
        return atomic_write_text(path, lines + "\n")

    def to_hf_dataset(self):
        """The records as a Hugging Face ``datasets.Dataset`` (spans serialised as JSON strings)."""
        import datasets

        rows = [{**r, "spans": json.dumps(r["spans"])} for r in self.to_records()]
        return datasets.Dataset.from_list(rows)


def _people(n: int, rng: random.Random) -> list[Person]:
    max_people = len(pools.FIRST_NAMES) * len(pools.LAST_NAMES)
    if n > max_people:
        raise ValueError(f"n_people={n} exceeds the {max_people} unique names the pools can make")
    seen: set[str] = set()
    people = []
    companies = pools.companies()
    while len(people) < n:
        name = f"{rng.choice(pools.FIRST_NAMES)} {rng.choice(pools.LAST_NAMES)}"
        if name in seen:  # rejection sampling keeps full names unique
            continue
        seen.add(name)
        company, hq = rng.choice(companies)
        attrs = {
            "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 2099)}",
            "birth_city": rng.choice(pools.CITIES),
            "university": rng.choice(pools.UNIVERSITIES),
            "major": rng.choice(pools.MAJORS),
            "company": company,
            "company_city": hq,
        }
        people.append(Person(len(people), name, rng.choice(("He", "She")), attrs))
    return people


def generate(spec: DataSpec, seed: int) -> FactDataset:
    """Sample people, biographies and the person split, deterministically from ``seed``."""
    if not 0 < spec.train_fraction < 1 or not 0 <= spec.validation_fraction < 1 - spec.train_fraction:
        raise ValueError(
            f"train_fraction={spec.train_fraction}, validation_fraction={spec.validation_fraction}: "
            "need 0 < train, 0 <= validation and train + validation < 1 (the held-out group must be non-empty)"
        )
    if not 1 <= spec.n_storage_templates <= 5 or not 1 <= spec.n_query_templates <= 2:
        raise ValueError("n_storage_templates must be in 1..5 and n_query_templates in 1..2")
    rng = random.Random(seed)
    people = _people(spec.n_people, rng)
    bios = [
        [
            biography(p, rng, spec.n_storage_templates, permute=spec.permute, fullname=spec.fullname, document=c)
            for c in range(spec.bios_per_person)
        ]
        for p in people
    ]
    order = list(range(spec.n_people))
    random.Random(seed + 1).shuffle(order)
    n_train = round(spec.train_fraction * spec.n_people)
    n_val = round(spec.validation_fraction * spec.n_people)
    split: dict[int, Split] = {}
    for rank, pid in enumerate(order):
        split[pid] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "heldout"
    return FactDataset(spec, seed, people, bios, split)
