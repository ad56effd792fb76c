"""The toolkit's fact types: a fact, its texts in the storage and query formats, and a set of facts from a file.

A :class:`Fact` is (subject, relation, answer), e.g. ("Marie Curie", "birth_city", "Warsaw"). It is written in two
formats, each text an :class:`Example` that **ends with the answer**:

- **storage** (a document that states the fact): ``"Marie Curie was born in Warsaw"``; earlier sentences of the same
  document may come first (they are context);
- **query** (a question and its answer): ``"Where was Marie Curie born?\\nAnswer: Warsaw"``.

Every text carries character spans per *role*: ``subject`` (the subject mention), ``relation`` (the words that name
the relation), ``answer`` (the answer, at the end), optionally ``cue`` (e.g. "Answer:"). Token positions come from the
tokenizer's offset mapping (:func:`mechrecall.tokenization.encode_example`), so any fast tokenizer works: subjects and
answers of several BPE tokens are ordinary (every answer token is scored; the subject role is all its tokens).

Your own facts
--------------

One JSON object per line (``.jsonl``; a ``.json`` file holding a list of the same objects, a list of dicts, or a
Hugging Face ``datasets.Dataset`` with the same columns work too)::

    {"id": "curie-birth", "subject": "Marie Curie", "relation": "birth_city", "answer": "Warsaw", "split": "train",
     "relation_text": ["was born in", "born"],
     "storage": ["Marie Curie was born in Warsaw"],
     "query": ["Where was Marie Curie born?\\nAnswer: Warsaw",
               {"text": "Q: Marie Curie's city of birth?\\nA: Warsaw",
                "spans": {"subject": [[3, 14]], "relation": [[17, 30]]}}]}

Fields (a value of ``null`` is the same as leaving the field out):

==================  ===========================================================================================
``id``              required; unique in the file (string or integer)
``subject``         required; the subject's name, e.g. ``"Marie Curie"``
``relation``        required; the relation's name, e.g. ``"birth_city"`` (facts are paired within a relation)
``answer``          required; e.g. ``"Warsaw"`` (a number is read as its string)
``storage``         a list of storage-format texts (or one text); each a string or ``{"text", "spans",
                    "relation_text"}``
``query``           the same for query-format texts; a fact needs at least one text of either format
``relation_text``   optional: the words that name the relation as written, a string or a list of alternatives
                    (the first one found in a text is used; a text may give its own)
``split``           optional: ``"train"`` / ``"validation"`` / ``"heldout"`` by convention (:meth:`FactSet.split`)
``meta``            optional: any JSON object, carried along untouched (in a ``Dataset``: a JSON string of one)
==================  ===========================================================================================

Spans are character offsets ``[[start, end], ...]`` (end exclusive; one ``[start, end]`` pair is accepted too, and
``[]`` says "this text has no such role"). Roles without spans are located by exact string match:

- ``answer``: the text must end with the ``answer`` field (trailing whitespace is dropped), at a word boundary;
- ``subject``: the last occurrence of the ``subject`` field before the answer;
- ``relation``: the last occurrence of ``relation_text`` before the answer (not overlapping the subject); with no
  ``relation_text`` the text has no relation role;
- ``cue``: only from spans.

An explicit answer span must cover exactly the ``answer`` field and end the text; subject, relation and cue spans
must lie before the answer. Anything else is a :class:`FactFormatError` whose one-line message names the file, the
record (``line N`` of a JSONL file, ``index N`` of a JSON list, ``row N`` of a dataset, and its id), the text
(``query[1]``) and the field, e.g.::

    facts.jsonl, line 7 (id 'curie-birth'), query[0]: field 'subject': 'Marie Curie' does not occur before the
    answer in 'Where was she born?\\nAnswer: Warsaw'

Unknown fields are refused too (a misspelt ``"querys"`` would otherwise drop every query text silently).

>>> facts = load_facts("my_facts.jsonl")
>>> facts.examples("storage"), facts.examples("query", split="heldout")
>>> load_facts(facts.to_hf_dataset()) == facts
True
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from mechrecall.io import atomic_write_text

__all__ = [
    "select_facts",
    "checkpoint_facts",
    "facts_file_name",
    "subjects_first",
    "Format",
    "FORMATS",
    "ROLES",
    "CharSpan",
    "FIELDS",
    "TEXT_FIELDS",
    "FactFormatError",
    "Example",
    "Fact",
    "FactSet",
    "fact_from_record",
    "facts_from_records",
    "load_facts",
    "example_record",
    "chat_example",
]

Format = Literal["storage", "query"]
FORMATS: tuple[Format, ...] = ("storage", "query")
ROLES: tuple[str, ...] = ("subject", "relation", "cue", "answer")
CharSpan = tuple[int, int]
FIELDS: tuple[str, ...] = ("id", "subject", "relation", "answer", "storage", "query", "relation_text", "split", "meta")
TEXT_FIELDS: tuple[str, ...] = ("text", "spans", "relation_text")
_BOUNDARY = ("", " ", "\n", "\t")


class FactFormatError(ValueError):
    """A fact record is malformed or a role cannot be located (the message names the file, record and field)."""


@dataclass(frozen=True)
class Example:
    """One fact in one format: ``text`` ends with the answer; ``spans`` maps role -> character spans in ``text``.

    ``subject_id`` identifies who or what the fact is about and ``relation`` names the relation (the lab: a person's
    id and an attribute such as ``"birth_city"``; a fact file: the fact's ``id``); a fact is ``(subject_id,
    relation)``. For storage texts cut from a longer document, ``document`` indexes it. ``template`` is the index of
    the text among the fact's texts of this format.
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
    """A fact and its texts: ``storage`` and ``query`` examples, an optional ``split`` and free-form ``meta``."""

    id: str
    subject: str
    relation: str
    answer: str
    storage: tuple[Example, ...]
    query: tuple[Example, ...]
    split: str | None = None
    meta: Mapping | None = field(default=None, hash=False)

    def texts(self, fmt: Format) -> tuple[Example, ...]:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        return self.storage if fmt == "storage" else self.query


@dataclass
class FactSet:
    """An ordered set of facts (the input type of every toolkit function that needs more than examples).

    Two fact sets are equal when their facts are (wherever they were read from).
    """

    facts: list[Fact]
    source: str = field(default="", compare=False)
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __getitem__(self, i):
        """A fact, or a :class:`FactSet` for a slice (``facts[:8]``)."""
        if isinstance(i, slice):
            return FactSet(self.facts[i], self.source)
        return self.facts[i]

    @property
    def relations(self) -> list[str]:
        """Relation names in order of first appearance."""
        return list(dict.fromkeys(f.relation for f in self.facts))

    @property
    def splits(self) -> list[str]:
        """The splits facts name, in order of first appearance (facts without one are left out)."""
        return list(dict.fromkeys(f.split for f in self.facts if f.split is not None))

    def split(self, split: str | Iterable[str] | None) -> FactSet:
        """The facts whose ``split`` is ``split`` (or any of several; ``None``: all)."""
        if split is None:
            return self
        wanted = {split} if isinstance(split, str) else set(split)
        return FactSet([f for f in self.facts if f.split in wanted], self.source)

    def where(self, keep) -> FactSet:
        return FactSet([f for f in self.facts if keep(f)], self.source)

    def require(self, *formats: Format) -> FactSet:
        """``self`` if every fact has a text of each of ``formats``; else a :class:`FactFormatError` naming one."""
        for fmt in formats:
            lacking = [f.id for f in self.facts if not f.texts(fmt)]
            if lacking:
                more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
                raise FactFormatError(
                    f"{self.source or 'facts'}: fact {lacking[0]!r}{more}: field {fmt!r}: missing (this analysis "
                    f"needs a {' and a '.join(formats)} text of every fact)"
                )
        return self

    def with_chat_template(self, tokenizer) -> FactSet:
        """The same facts with every query text wrapped in ``tokenizer``'s chat template (:func:`chat_example`), role
        spans kept; storage texts unchanged. For instruct models, which otherwise end their turn where a base model
        would answer."""
        return FactSet(
            [replace(f, query=tuple(chat_example(ex, tokenizer) for ex in f.query)) for f in self.facts],
            f"{self.source} (queries in {getattr(tokenizer, 'name_or_path', '') or 'the'} chat template)",
        )

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
        """One record per fact in the file format, every role's spans explicit (``[]`` where a text has none)."""

        def text(ex: Example) -> dict:
            return {"text": ex.text, "spans": {r: [list(s) for s in ex.spans.get(r, ())] for r in ROLES}}

        out = []
        for f in self.facts:
            rec = {
                "id": f.id,
                "subject": f.subject,
                "relation": f.relation,
                "answer": f.answer,
                "split": f.split,
                "storage": [text(e) for e in f.storage],
                "query": [text(e) for e in f.query],
            }
            if f.meta is not None:
                rec["meta"] = dict(f.meta)
            out.append(rec)
        return out

    def to_jsonl(self, path: str | Path) -> Path:
        return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.to_records()))

    def to_hf_dataset(self):
        """The records as a Hugging Face ``datasets.Dataset``: nested columns (``storage`` / ``query``: lists of
        ``{text, spans}``), ``meta`` as a JSON string; ``load_facts`` reads it back equal."""
        import datasets

        rows = self.to_records()
        if any("meta" in r for r in rows):
            rows = [{**r, "meta": json.dumps(r["meta"]) if "meta" in r else None} for r in rows]
        return datasets.Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------ reading facts
def _fail(where: str, field_name: str, msg: str) -> FactFormatError:
    return FactFormatError(f"{where}: field {field_name!r}: {msg}")


def _short(text: str, n: int = 120) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _occurrences(hay: str, needle: str) -> Iterator[CharSpan]:
    """Every span of ``needle`` in ``hay``, last first."""
    i = hay.rfind(needle)
    while i >= 0 and needle:
        yield (i, i + len(needle))
        i = hay.rfind(needle, 0, i + len(needle) - 1)


def _overlaps(span: CharSpan, others: Iterable[CharSpan]) -> bool:
    return any(span[0] < e and span[1] > s for s, e in others)


def _scalar(rec: Mapping, key: str, where: str) -> str:
    value = rec.get(key)
    if value is None or value == "":
        raise _fail(where, key, "missing")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _fail(where, key, f"a string, got {type(value).__name__}")
    return str(value)


def _strings(value, where: str, field_name: str) -> tuple[str, ...]:
    """``relation_text``: a string or a list of strings (alternatives)."""
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) and v for v in values):
        raise _fail(where, field_name, "a non-empty string or a list of them")
    return tuple(values)


def _spans(raw, where: str, text: str) -> dict[str, tuple[CharSpan, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _fail(where, "spans", f"an object {{role: [[start, end], ...]}}, got {type(raw).__name__}")
    out: dict[str, tuple[CharSpan, ...]] = {}
    for role, spans in raw.items():
        if role not in ROLES:
            raise _fail(where, f"spans.{role}", f"unknown role; expected one of {', '.join(ROLES)}")
        if spans is None:  # a dataset's struct column fills roles a text does not give with None
            continue
        if isinstance(spans, list | tuple) and len(spans) == 2 and all(isinstance(x, int) for x in spans):
            spans = [spans]  # one [start, end] pair
        try:
            pairs = tuple((a, b) for a, b in spans)
            if not all(isinstance(x, int) and not isinstance(x, bool) for p in pairs for x in p):
                raise TypeError
        except (TypeError, ValueError):
            raise _fail(where, f"spans.{role}", f"[[start, end], ...] character offsets, got {spans!r}") from None
        bad = [p for p in pairs if not 0 <= p[0] < p[1] <= len(text)]
        if bad:
            raise _fail(where, f"spans.{role}", f"span {list(bad[0])} lies outside the text (length {len(text)})")
        out[role] = tuple(sorted(pairs))
    return out


def _example(rec: Mapping, entry, fmt: Format, i: int, fact_id: str, where: str) -> Example:
    where = f"{where}, {fmt}[{i}]"
    own_rel: tuple[str, ...] = ()
    if isinstance(entry, str):
        text, given = entry, None
    elif isinstance(entry, Mapping):
        unknown = [k for k in entry if k not in TEXT_FIELDS]
        if unknown:
            raise _fail(where, unknown[0], f"unknown field of a text; expected {', '.join(TEXT_FIELDS)}")
        text, given = entry.get("text"), entry.get("spans")
        if not isinstance(text, str):
            raise _fail(where, "text", "missing (each text is a string or {'text': ..., 'spans': {...}})")
        own_rel = _strings(entry.get("relation_text"), where, "relation_text")
    else:
        raise _fail(where, fmt, f"each text is a string or {{'text': ..., 'spans': {{...}}}}, got {entry!r}")
    text = text.rstrip()
    if not text:
        raise _fail(where, "text", "empty")
    spans = _spans(given, where, text)
    answer = str(rec["answer"])

    # answer: the end of the text
    if "answer" in spans:
        if len(spans["answer"]) != 1:
            raise _fail(where, "spans.answer", f"one span, got {len(spans['answer'])}")
        a0, a1 = spans["answer"][0]
        if text[a0:a1] != answer or a1 != len(text):
            raise _fail(where, "spans.answer", f"must cover the answer {answer!r} at the end of {_short(text)}, "
                                               f"covers {text[a0:a1]!r}")  # fmt: skip
    else:
        if not text.endswith(answer):
            raise _fail(where, "answer", f"{answer!r} does not end the text {_short(text)}")
        spans["answer"] = ((len(text) - len(answer), len(text)),)
    a0 = spans["answer"][0][0]
    if text[a0 - 1 : a0] not in _BOUNDARY:
        raise _fail(where, "answer", f"{answer!r} must start a word (after a space or newline) in {_short(text)}")
    if not text[:a0].strip():
        raise _fail(where, "answer", f"nothing comes before the answer in {_short(text)}")

    # roles given as spans must come before the answer
    for role in ("subject", "relation", "cue"):
        late = [s for s in spans.get(role, ()) if s[1] > a0]
        if late:
            raise _fail(where, f"spans.{role}", f"span {list(late[0])} reaches into the answer (from {a0})")

    # subject: its last mention before the answer
    if "subject" not in spans:
        s = next(_occurrences(text[:a0], str(rec["subject"])), None)
        if s is None:
            raise _fail(where, "subject", f"{rec['subject']!r} does not occur before the answer in {_short(text)}")
        spans["subject"] = (s,)

    # relation: its words (relation_text) last written before the answer, not inside the subject
    if "relation" not in spans:
        alternatives = own_rel or _strings(rec.get("relation_text"), where, "relation_text")
        found = None
        for alt in alternatives:
            found = next((r for r in _occurrences(text[:a0], alt) if not _overlaps(r, spans["subject"])), None)
            if found is not None:
                break
        if alternatives and found is None:
            alts = " / ".join(repr(a) for a in alternatives)
            raise _fail(where, "relation_text", f"{alts} does not occur before the answer in {_short(text)}")
        spans["relation"] = (found,) if found is not None else ()
    spans.setdefault("cue", ())
    return Example(fact_id, str(rec["relation"]), fmt, text, {r: spans[r] for r in ROLES}, i)


def _texts(raw, where: str, fmt: str) -> list:
    if raw is None:
        return []
    if isinstance(raw, str | Mapping):
        return [raw]
    if not isinstance(raw, list | tuple):
        raise _fail(where, fmt, f"a list of texts, got {type(raw).__name__}")
    return list(raw)


def _meta(raw, where: str) -> Mapping | None:
    if raw is None:
        return None
    if isinstance(raw, str):  # a dataset column
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise _fail(where, "meta", "a JSON object (in a dataset: a JSON string of one)") from None
    if not isinstance(raw, Mapping):
        raise _fail(where, "meta", f"a JSON object, got {type(raw).__name__}")
    return raw


def fact_from_record(rec: Mapping, where: str = "record") -> Fact:
    """One :class:`Fact` from a record (see the module docstring); errors name ``where`` and the field."""
    if not isinstance(rec, Mapping):
        raise FactFormatError(f"{where}: a fact record is a JSON object, got {type(rec).__name__}")
    fact_id = _scalar(rec, "id", where)
    where = f"{where} (id {fact_id!r})"
    unknown = [k for k in rec if k not in FIELDS]
    if unknown:
        raise _fail(where, unknown[0], f"unknown field; a fact record has {', '.join(FIELDS)}")
    subject, relation, answer = (_scalar(rec, k, where) for k in ("subject", "relation", "answer"))
    rec = {**rec, "subject": subject, "relation": relation, "answer": answer}
    _strings(rec.get("relation_text"), where, "relation_text")
    texts = {
        fmt: tuple(_example(rec, e, fmt, i, fact_id, where) for i, e in enumerate(_texts(rec.get(fmt), where, fmt)))
        for fmt in FORMATS
    }
    if not texts["storage"] and not texts["query"]:
        raise _fail(where, "storage", "a fact needs at least one storage or query text")
    split = rec.get("split")
    if split is not None and (not isinstance(split, str) or not split):
        raise _fail(where, "split", f"a string, got {split!r}")
    return Fact(
        fact_id, subject, relation, answer, texts["storage"], texts["query"], split, _meta(rec.get("meta"), where)
    )


def _read(numbered: Iterable[tuple[str, object]], source: str) -> FactSet:
    facts, seen = [], {}
    for where, rec in numbered:
        fact = fact_from_record(rec, where)
        if fact.id in seen:
            raise FactFormatError(f"{where} (id {fact.id!r}): field 'id': duplicate of {seen[fact.id]}")
        seen[fact.id] = where.removeprefix(f"{source}, ")
        facts.append(fact)
    if not facts:
        raise FactFormatError(f"{source}: no fact records")
    return FactSet(facts, source)


def facts_from_records(records: Iterable[Mapping], source: str = "records", label: str = "record") -> FactSet:
    """A :class:`FactSet` from records; errors say ``<source>, <label> <i>`` (``i`` counted from 0)."""
    return _read(((f"{source}, {label} {i}", r) for i, r in enumerate(records)), source)


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}, line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise FactFormatError(f"{path}, line {n}, column {e.colno}: not valid JSON ({_json_msg(e)})") from None


def _json_msg(e) -> str:
    """A JSON error's message without a dangling "at" (``Unterminated string starting at``): the caller says where."""
    return e.msg.removesuffix(" at").removesuffix(":")


def chat_example(example: Example, tokenizer) -> Example:
    """``example`` with its prompt as the user's turn of ``tokenizer``'s chat template and its answer as the start of
    the assistant's turn (``apply_chat_template(..., add_generation_prompt=True)`` followed by the answer, its leading
    space dropped). Role spans move with the prompt inside the rendered template; the answer span is the new text's
    end. The tokenizer's end-of-sequence token (for chat models the end of turn) is what query recall expects after the
    answer. Raises ``ValueError`` for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')!r} has no chat template")
    prompt = example.text[: example.answer_start]
    stripped = prompt.rstrip()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": stripped}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    bos = getattr(tokenizer, "bos_token", None)
    if bos and rendered.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        rendered = rendered[len(bos) :]  # the template writes <bos> and the tokenizer adds it again: keep one
    offset = rendered.rfind(stripped)
    if offset < 0:
        raise ValueError(f"the chat template does not keep the prompt {stripped[:60]!r} verbatim")
    answer = example.answer.lstrip()
    text = rendered + answer
    spans = {
        role: tuple((a + offset, b + offset) for a, b in spans)
        for role, spans in example.spans.items()
        if role != "answer"
    }
    spans["answer"] = ((len(rendered), len(text)),)
    return replace(example, text=text, spans=spans)


def load_facts(source) -> FactSet:
    """A :class:`FactSet` from a JSONL file, a JSON list file, a ``datasets.Dataset`` or a list of records."""
    if isinstance(source, FactSet):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FactFormatError(f"{path}: no such fact file")
        try:
            if path.suffix == ".json":
                try:
                    records = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise FactFormatError(
                        f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({_json_msg(e)})"
                    ) from None
                if not isinstance(records, list):
                    raise FactFormatError(f"{path}: a .json fact file holds a list of records (or use .jsonl)")
                return facts_from_records(records, str(path), "index")
            return _read(_jsonl(path), str(path))
        except UnicodeDecodeError as e:
            raise FactFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if hasattr(source, "column_names") and isinstance(source.column_names, dict):  # datasets.DatasetDict
        raise FactFormatError(f"a DatasetDict with splits {list(source.column_names)}: pass one, e.g. ds['train']")
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return facts_from_records(source.to_list(), "dataset", "row")
    if isinstance(source, Mapping):
        raise FactFormatError("load_facts takes a file, a dataset or a list of records, not one record")
    return facts_from_records(list(source))


def example_record(ex: Example) -> dict:
    """An example as a JSON-able dict (for exports and caches)."""
    return asdict(ex)


def select_facts(facts, split: str | None = None, count: int | None = None, formats=("storage", "query")) -> FactSet:
    """A fact file / dataset / :class:`FactSet`, one ``split`` of it (``None``: all), its first ``count`` facts, each
    with texts in ``formats`` (a fact without one is an error naming it)."""
    fs = load_facts(facts)
    chosen = fs.split(split)
    if not len(chosen):
        raise FactFormatError(f"{fs.source}: no fact has split {split!r} (splits: {', '.join(fs.splits) or 'none'})")
    return (chosen[:count] if count else chosen).require(*formats)


def subjects_first(facts: FactSet, n: int) -> FactSet:
    """The facts of the first ``n`` subjects, in order (a lab run's "first n people" of a split)."""
    keep: dict[str, None] = {}
    for f in facts:
        if f.subject not in keep and len(keep) == n:
            break
        keep.setdefault(f.subject)
    return facts.where(lambda f: f.subject in keep)


def facts_file_name(dataset_hash: str) -> str:
    """The file name a training run gives its facts: the dataset's hash in the name, so that a checkpoint finds its
    own facts and never another run's."""
    return f"facts-{dataset_hash}.jsonl"


def checkpoint_facts(location: str | Path, meta: Mapping | None = None, *, levels: int = 3) -> FactSet:
    """The facts a checkpoint folder was trained on, read from the files beside it (data, never code).

    A folder that holds ``facts.jsonl`` brings its own. A training run's checkpoint (its ``meta``, the folder's
    ``mechrecall.json``, records a ``dataset_hash``) finds ``data/facts-<hash>.jsonl`` in the run folder up to
    ``levels`` folders above it (``run/mixed/final``, ``run/mixed/checkpoints/step-N``, ``run/data/base``). Anything
    else raises :class:`FactFormatError` saying where it looked: pass the facts explicitly then (``--facts FILE``).
    """
    from mechrecall.checkpoint import read_meta

    folder = Path(location)
    meta = read_meta(folder) if meta is None and folder.is_dir() else (meta or {})
    looked = [folder / "facts.jsonl"]
    if meta.get("dataset_hash"):
        name = facts_file_name(meta["dataset_hash"])
        looked += [up / "data" / name for up in [folder, *folder.parents][: levels + 1]]
        looked += [up / name for up in folder.parents[:levels]]
    for path in looked:
        if path.is_file():
            return load_facts(path)
    where = ", ".join(str(p) for p in dict.fromkeys(looked))
    raise FactFormatError(f"{folder}: no facts file beside this checkpoint (looked for {where}); pass --facts FILE")
