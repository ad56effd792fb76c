"""The toolkit's fact types: a fact, its texts in the storage and query formats, and a set of facts from a file.

A :class:`Fact` is (subject, relation, answer), e.g. ("Anya Forger", "birth_city", "Princeton, NJ"). It is written in
two formats, each text an :class:`Example` that **ends with the answer**:

- **storage** (a document that states the fact): ``"Anya Forger was born in Princeton, NJ"``; earlier sentences of
  the same document may come first (they are context);
- **query** (a question and its answer): ``"Where was Anya Forger born?\\nAnswer: Princeton, NJ"``.

Every text carries character spans per *role*: ``subject`` (the subject mention), ``relation`` (the words that name
the relation), ``answer`` (the answer, at the end), optionally ``cue`` (e.g. "Answer:"). Token positions come from the
tokenizer's offset mapping (:func:`mechrecall.tokenization.encode_example`), so any fast tokenizer works, BPE included.

Your own facts: one JSON object per line (or a Hugging Face ``datasets.Dataset`` with the same columns)::

    {"id": "f1", "subject": "Marie Curie", "relation": "birth_city", "answer": "Warsaw", "split": "train",
     "storage": ["Marie Curie was born in Warsaw"],
     "query": ["Where was Marie Curie born?\\nAnswer: Warsaw"]}

``storage`` and ``query`` are lists of texts, each a string or ``{"text": ..., "spans": {"subject": [[s, e]], ...}}``.
Without spans, ``subject`` and ``answer`` are located by exact string match (the answer must end the text, the
subject is its last mention before the answer), and ``relation`` by ``relation_text`` when a record gives it (the
words of the relation as written, e.g. "was born in"; default: none). A record whose subject, relation or answer
cannot be found gets a :class:`FactFormatError` naming the file, the record and the field. ``split`` is optional
(``train`` / ``validation`` / ``heldout`` by convention); :meth:`FactSet.split` selects by it.

>>> facts = load_facts("my_facts.jsonl")
>>> facts.examples("storage"), facts.examples("query", split="heldout")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mechrecall.io import atomic_write_text

Format = Literal["storage", "query"]
FORMATS: tuple[Format, ...] = ("storage", "query")
ROLES: tuple[str, ...] = ("subject", "relation", "cue", "answer")
CharSpan = tuple[int, int]


class FactFormatError(ValueError):
    """A fact record is malformed or a role cannot be located (the message names the file, record and field)."""


@dataclass(frozen=True)
class Example:
    """One fact in one format: ``text`` ends with the answer; ``spans`` maps role -> character spans in ``text``.

    ``subject_id`` identifies who or what the fact is about and ``relation`` names the relation (the lab: a person's
    id and an attribute such as ``"birth_city"``); a fact is ``(subject_id, relation)``. For storage texts cut from a
    longer document, ``document`` indexes it. ``template`` is the index of the text among the fact's texts of this
    format.
    """

    subject_id: int | str
    relation: str
    format: Format
    text: str
    spans: dict[str, tuple[CharSpan, ...]]
    template: int = 0
    document: int = -1

    @property
    def answer_start(self) -> int:
        return self.spans["answer"][0][0]

    @property
    def prompt(self) -> str:
        return self.text[: self.answer_start].rstrip(" ")

    @property
    def answer(self) -> str:
        start, end = self.spans["answer"][0]
        return self.text[start:end]

    @property
    def key(self) -> tuple[int | str, str]:
        """The fact this text states: ``(subject_id, relation)``."""
        return (self.subject_id, self.relation)


@dataclass(frozen=True)
class Fact:
    """A fact and its texts: ``storage`` and ``query`` examples, and an optional person/fact ``split``."""

    id: str
    subject: str
    relation: str
    answer: str
    storage: tuple[Example, ...]
    query: tuple[Example, ...]
    split: str | None = None

    def texts(self, fmt: Format) -> tuple[Example, ...]:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        return self.storage if fmt == "storage" else self.query


@dataclass
class FactSet:
    """An ordered set of facts (the input type of every toolkit function that needs more than examples)."""

    facts: list[Fact]
    source: str = ""
    _index: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __getitem__(self, i: int) -> Fact:
        return self.facts[i]

    @property
    def relations(self) -> list[str]:
        """Relation names in order of first appearance."""
        return list(dict.fromkeys(f.relation for f in self.facts))

    def split(self, split: str | Iterable[str] | None) -> FactSet:
        """The facts whose ``split`` is ``split`` (or any of several; ``None``: all)."""
        if split is None:
            return self
        wanted = {split} if isinstance(split, str) else set(split)
        return FactSet([f for f in self.facts if f.split in wanted], self.source)

    def where(self, keep) -> FactSet:
        return FactSet([f for f in self.facts if keep(f)], self.source)

    def examples(
        self, fmt: Format, split: str | Iterable[str] | None = None, templates: Sequence[int] | None = None
    ) -> list[Example]:
        """Every text of format ``fmt`` (those with index in ``templates`` if given), fact by fact."""
        out = []
        for f in self.split(split):
            texts = f.texts(fmt)
            out += list(texts) if templates is None else [texts[t] for t in templates if t < len(texts)]
        return out

    def fact_of(self, example: Example) -> Fact:
        """The fact an example states (by ``(subject_id, relation)``)."""
        if not self._index:
            self._index = {(f.storage or f.query)[0].key: f for f in self.facts}
        return self._index[example.key]

    def split_of(self, example: Example) -> str | None:
        return self.fact_of(example).split

    # ------------------------------------------------------------------------------------------ serialisation
    def to_records(self) -> list[dict]:
        def text(ex: Example) -> dict:
            return {"text": ex.text, "spans": {r: [list(s) for s in ss] for r, ss in ex.spans.items() if ss}}

        return [
            {
                "id": f.id,
                "subject": f.subject,
                "relation": f.relation,
                "answer": f.answer,
                "split": f.split,
                "storage": [text(e) for e in f.storage],
                "query": [text(e) for e in f.query],
            }
            for f in self.facts
        ]

    def to_jsonl(self, path: str | Path) -> Path:
        return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.to_records()))

    def to_hf_dataset(self):
        """The records as a Hugging Face ``datasets.Dataset`` (texts and spans as JSON strings per format)."""
        import datasets

        rows = [{**r, "storage": json.dumps(r["storage"]), "query": json.dumps(r["query"])} for r in self.to_records()]
        return datasets.Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------ reading facts
def _fail(where: str, field_name: str, msg: str) -> FactFormatError:
    return FactFormatError(f"{where}: field {field_name!r}: {msg}")


def _locate(text: str, needle: str, *, end: int | None = None, last: bool = True) -> CharSpan | None:
    """Character span of ``needle`` in ``text[:end]`` (its last occurrence by default), or None."""
    hay = text if end is None else text[:end]
    i = hay.rfind(needle) if last else hay.find(needle)
    return None if i < 0 or not needle else (i, i + len(needle))


def _spans(raw: Mapping, where: str, text: str) -> dict[str, tuple[CharSpan, ...]]:
    out: dict[str, tuple[CharSpan, ...]] = {}
    for role, spans in raw.items():
        if role not in ROLES:
            raise _fail(where, f"spans.{role}", f"unknown role; expected one of {ROLES}")
        try:
            pairs = tuple((int(a), int(b)) for a, b in spans)
        except (TypeError, ValueError):
            raise _fail(where, f"spans.{role}", "spans are [[start, end], ...] character offsets") from None
        if any(not 0 <= a < b <= len(text) for a, b in pairs):
            raise _fail(where, f"spans.{role}", f"a span lies outside the text (length {len(text)}): {pairs}")
        out[role] = pairs
    return out


def _example(rec: Mapping, entry, fmt: Format, i: int, subject_id, where: str) -> Example:
    where = f"{where}, {fmt}[{i}]"
    if isinstance(entry, str):
        text, given = entry, {}
    elif isinstance(entry, Mapping) and isinstance(entry.get("text"), str):
        text, given = entry["text"], entry.get("spans") or {}
    else:
        raise _fail(where, fmt, "each text is a string or {'text': ..., 'spans': {...}}")
    spans = _spans(given, where, text)
    answer = str(rec["answer"])
    if "answer" not in spans:
        if not text.rstrip().endswith(answer):
            raise _fail(where, "answer", f"{answer!r} does not end the text {text!r}")
        a1 = len(text.rstrip())
        spans["answer"] = ((a1 - len(answer), a1),)
    a0 = spans["answer"][0][0]
    if text[a0 - 1 : a0] not in ("", " ", "\n", "\t"):
        raise _fail(where, "answer", f"the answer must start at a word boundary in {text!r}")
    if "subject" not in spans:
        s = _locate(text, str(rec["subject"]), end=a0)
        if s is None:
            raise _fail(where, "subject", f"{rec['subject']!r} does not occur before the answer in {text!r}")
        spans["subject"] = (s,)
    if "relation" not in spans:
        rel = rec.get("relation_text")
        if rel:
            r = _locate(text, str(rel), end=a0)
            if r is None:
                raise _fail(where, "relation_text", f"{rel!r} does not occur before the answer in {text!r}")
            spans["relation"] = (r,)
        else:
            spans["relation"] = ()
    spans.setdefault("cue", ())
    return Example(subject_id, str(rec["relation"]), fmt, text, spans, i)


def fact_from_record(rec: Mapping, where: str = "record") -> Fact:
    """One :class:`Fact` from a record (see the module docstring); errors name ``where`` and the field."""
    if not isinstance(rec, Mapping):
        raise FactFormatError(f"{where}: a fact record is a JSON object, got {type(rec).__name__}")
    for key in ("id", "subject", "relation", "answer"):
        if key not in rec or rec[key] in (None, ""):
            raise _fail(where, key, "missing")
    where = f"{where} (id {rec['id']!r})"
    texts = {}
    for fmt in FORMATS:
        raw = rec.get(fmt, [])
        if isinstance(raw, str):
            try:
                raw = json.loads(raw) if raw.lstrip().startswith("[") else [raw]
            except json.JSONDecodeError:
                raw = [raw]
        if not isinstance(raw, list):
            raise _fail(where, fmt, "a list of texts")
        texts[fmt] = tuple(_example(rec, e, fmt, i, str(rec["id"]), where) for i, e in enumerate(raw))
    if not texts["storage"] and not texts["query"]:
        raise _fail(where, "storage", "a fact needs at least one storage or query text")
    split = rec.get("split")
    return Fact(
        str(rec["id"]), str(rec["subject"]), str(rec["relation"]), str(rec["answer"]), texts["storage"],
        texts["query"], None if split is None else str(split),
    )  # fmt: skip


def facts_from_records(records: Iterable[Mapping], source: str = "records") -> FactSet:
    facts, seen = [], set()
    for i, rec in enumerate(records):
        fact = fact_from_record(rec, f"{source}, record {i + 1}")
        if fact.id in seen:
            raise FactFormatError(f"{source}, record {i + 1}: field 'id': duplicate id {fact.id!r}")
        seen.add(fact.id)
        facts.append(fact)
    if not facts:
        raise FactFormatError(f"{source}: no fact records")
    return FactSet(facts, source)


def load_facts(source) -> FactSet:
    """A :class:`FactSet` from a JSONL file, a JSON list file, a ``datasets.Dataset`` or a list of records."""
    if isinstance(source, FactSet):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FactFormatError(f"{path}: no such fact file")
        text = path.read_text()
        if path.suffix == ".json":
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise FactFormatError(f"{path}: not valid JSON ({e})") from None
            return facts_from_records(records, str(path))
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FactFormatError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        return facts_from_records(records, str(path))
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return facts_from_records(source.to_list(), "dataset")
    return facts_from_records(list(source))


def example_record(ex: Example) -> dict:
    """An example as a JSON-able dict (for exports and caches)."""
    return asdict(ex)
