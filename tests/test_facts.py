"""The fact-set format: records -> facts with role spans, every kind of bad record, files, datasets, BPE tokens."""

import json
from pathlib import Path

import pytest

from mechrecall.facts import FactFormatError, FactSet, fact_from_record, facts_from_records, load_facts
from mechrecall.tokenization import check_tokenization

DATA = Path(__file__).resolve().parent / "data"
FACTS = DATA / "facts.jsonl"
ROOT = Path(__file__).resolve().parents[1]


def rec(**kw) -> dict:
    base = {
        "id": "curie",
        "subject": "Marie Curie",
        "relation": "birth_city",
        "answer": "Warsaw",
        "relation_text": ["was born in", "born"],
        "storage": ["Marie Curie was born in Warsaw"],
        "query": ["Where was Marie Curie born?\nAnswer: Warsaw"],
    }
    return {k: v for k, v in {**base, **kw}.items() if v is not ...}


def roles(ex) -> dict:
    return {r: [ex.text[a:b] for a, b in spans] for r, spans in ex.spans.items()}


# ---------------------------------------------------------------------------------------------------- locating
def test_roles_are_located_by_exact_match():
    f = fact_from_record(rec())
    assert roles(f.storage[0]) == {"subject": ["Marie Curie"], "relation": ["was born in"], "cue": [],
                                   "answer": ["Warsaw"]}  # fmt: skip
    q = f.query[0]
    assert roles(q) == {"subject": ["Marie Curie"], "relation": ["born"], "cue": [], "answer": ["Warsaw"]}
    assert (
        q.prompt == "Where was Marie Curie born?\nAnswer:" and q.answer == "Warsaw" and q.key == ("curie", "birth_city")
    )
    assert f.split is None and f.storage[0].format == "storage" and q.format == "query"


def test_subject_is_its_last_mention_before_the_answer_and_relation_avoids_it():
    text = "Marie Curie met Pierre. Marie Curie was born in Warsaw"
    f = fact_from_record(rec(storage=[text], query=...))
    (s,) = f.storage[0].spans["subject"]
    assert s == (24, 35)
    # a relation word inside the subject is not the relation
    g = fact_from_record(rec(subject="Bornholm Smith", relation_text="born", storage=["Bornholm Smith was born in Ulm"],
                             answer="Ulm", query=...))  # fmt: skip
    assert roles(g.storage[0])["relation"] == ["born"] and g.storage[0].spans["relation"][0][0] == 19


def test_relation_text_alternatives_per_record_and_per_text():
    f = fact_from_record(
        rec(relation_text=..., storage=[{"text": "Marie Curie was born in Warsaw", "relation_text": "was born"}])
    )
    assert roles(f.storage[0])["relation"] == ["was born"]
    assert roles(f.query[0])["relation"] == []  # no relation_text: the text has no relation role
    g = fact_from_record(rec(relation_text=["nowhere", "born"]))
    assert roles(g.storage[0])["relation"] == ["born"]


def test_explicit_spans_win_and_may_name_a_pronoun():
    text = "Marie Curie won two Nobel Prizes. She was born in Warsaw"
    f = fact_from_record(
        rec(storage=[{"text": text, "spans": {"subject": [34, 37], "cue": [], "relation": [[38, 49]]}}])
    )
    assert roles(f.storage[0]) == {"subject": ["She"], "relation": ["was born in"], "cue": [], "answer": ["Warsaw"]}
    q = "Q: Marie Curie?\nA: Warsaw"
    g = fact_from_record(rec(query=[{"text": q, "spans": {"relation": [], "answer": [[len(q) - 6, len(q)]],
                                                          "cue": [[16, 18]]}}]))  # fmt: skip
    assert roles(g.query[0]) == {"subject": ["Marie Curie"], "relation": [], "cue": ["A:"], "answer": ["Warsaw"]}


def test_trailing_whitespace_numbers_and_single_texts():
    f = fact_from_record(rec(id=7, answer=1867, subject="Marie Curie", relation_text=..., storage="Marie Curie, born 1867 \n",
                             query=None))  # fmt: skip
    assert f.id == "7" and f.answer == "1867" and f.storage[0].text == "Marie Curie, born 1867" and f.query == ()


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "changes, field, message",
    [
        ({"id": ...}, "'id'", "missing"),
        ({"subject": ""}, "'subject'", "missing"),
        ({"answer": ["Warsaw"]}, "'answer'", "a string"),
        ({"querys": []}, "'querys'", "unknown field"),
        ({"storage": [], "query": []}, "'storage'", "at least one"),
        ({"storage": {"txt": "x"}}, "'txt'", "unknown field of a text"),
        ({"storage": [3]}, "'storage'", "each text is a string"),
        ({"storage": ["Marie Curie was born in Warsaw, Poland"]}, "'answer'", "does not end the text"),
        ({"storage": ["Marie Curie was born inWarsaw"]}, "'answer'", "must start a word"),
        ({"storage": ["Warsaw"]}, "'answer'", "nothing comes before"),
        ({"query": ["Where was she born?\nAnswer: Warsaw"]}, "'subject'", "does not occur before the answer"),
        ({"relation_text": "came from"}, "'relation_text'", "'came from' does not occur"),
        ({"relation_text": ["", "born"]}, "'relation_text'", "non-empty string"),
        ({"storage": [{"text": "Marie Curie was born in Warsaw", "spans": {"who": [[0, 5]]}}]}, "'spans.who'", "unknown role"),
        ({"storage": [{"text": "Marie Curie was born in Warsaw", "spans": {"subject": [[0, 99]]}}]}, "'spans.subject'",
         "outside the text"),
        ({"storage": [{"text": "Marie Curie was born in Warsaw", "spans": {"subject": "0-5"}}]}, "'spans.subject'",
         "character offsets"),
        ({"storage": [{"text": "Marie Curie was born in Warsaw", "spans": {"answer": [[0, 5]]}}]}, "'spans.answer'",
         "must cover the answer"),
        ({"storage": [{"text": "Marie Curie was born in Warsaw", "spans": {"relation": [[12, 28]]}}]},
         "'spans.relation'", "reaches into the answer"),
        ({"split": 3}, "'split'", "a string"),
        ({"meta": "not json"}, "'meta'", "a JSON object"),
    ],
)  # fmt: skip
def test_bad_records_name_record_text_and_field(changes, field, message):
    with pytest.raises(FactFormatError) as info:
        facts_from_records([rec(id="ok"), rec(**changes)], "my.jsonl", "line")
    msg = str(info.value)
    assert msg.startswith("my.jsonl, line 1") and f"field {field}" in msg and message in msg and "\n" not in msg
    if changes.get("id", 0) is not ...:
        assert "(id " in msg


def test_errors_in_a_file_name_line_id_and_text(tmp_path):
    lines = [
        json.dumps(rec(id="a")),
        "",
        json.dumps(rec(id="b", query=["ok?\nAnswer: Warsaw", "Where was she born? Warsaw"])),
    ]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FactFormatError) as info:
        load_facts(path)
    assert str(info.value).startswith(f"{path}, line 3 (id 'b'), query[0]: field 'subject'")
    path.write_text(json.dumps(rec(id="a")) + "\n" + json.dumps(rec(id="a")) + "\n")
    with pytest.raises(FactFormatError, match=r"line 2 \(id 'a'\): field 'id': duplicate of line 1"):
        load_facts(path)
    path.write_text(json.dumps(rec()) + "\n{not json\n")
    with pytest.raises(FactFormatError, match=r"line 2, column \d+: not valid JSON"):
        load_facts(path)
    with pytest.raises(FactFormatError, match="no such fact file"):
        load_facts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FactFormatError, match="no fact records"):
        load_facts(tmp_path / "empty.jsonl")
    (tmp_path / "one.json").write_text(json.dumps(rec()))
    with pytest.raises(FactFormatError, match="holds a list"):
        load_facts(tmp_path / "one.json")
    (tmp_path / "list.json").write_text(json.dumps([rec(id="a"), rec(id="b", answer="Paris")]))
    with pytest.raises(FactFormatError, match=r"list.json, index 1 \(id 'b'\), storage\[0\]: field 'answer'"):
        load_facts(tmp_path / "list.json")


def test_bad_records_file_one_error_per_line():
    """tests/data/bad_facts.jsonl: every line is wrong in one field; each alone fails with that field named."""
    lines = (DATA / "bad_facts.jsonl").read_text().splitlines()
    for n, line in enumerate(lines, 1):
        case = json.loads(line)
        expected = case.pop("_expect")
        with pytest.raises(FactFormatError) as info:
            facts_from_records([case], "bad_facts.jsonl", "line")
        assert f"field '{expected}'" in str(info.value), (n, str(info.value))


# ---------------------------------------------------------------------------------------------------- the file
def test_the_fact_file():
    facts = load_facts(FACTS)
    assert 24 <= len(facts) <= 40 and len(facts.relations) >= 4
    assert facts.splits == ["train", "validation", "heldout"]
    assert all(f.storage and f.query for f in facts)
    texts = [ex for f in facts for ex in (*f.storage, *f.query)]
    assert all(ex.spans["subject"] and ex.spans["answer"] and ex.spans["relation"] for ex in texts)
    raw = [json.loads(line) for line in FACTS.read_text().splitlines()]
    assert any("spans" in t for r in raw for t in r["storage"] + r["query"] if isinstance(t, dict))
    assert any("relation_text" in r for r in raw)
    assert any(" " in f.subject for f in facts) and any(" " in f.answer for f in facts)
    assert len(facts.split("heldout")) >= 8 and facts.split(["train", "validation"]).splits == ["train", "validation"]
    assert facts[:3].source == facts.source and len(facts[:3]) == 3


def test_round_trips_through_jsonl_json_and_a_dataset(tmp_path):
    facts = load_facts(FACTS)
    assert load_facts(facts.to_jsonl(tmp_path / "again.jsonl")) == facts
    (tmp_path / "again.json").write_text(json.dumps(facts.to_records()))
    assert load_facts(tmp_path / "again.json") == facts
    ds = facts.to_hf_dataset()
    assert set(ds.column_names) >= {"id", "subject", "relation", "answer", "split", "storage", "query"}
    back = load_facts(ds)
    assert back == facts and back.source == "dataset"
    assert back[28].meta == facts[28].meta == {"invented": True, "note": "a made-up person and company"}


def test_a_dataset_with_the_file_columns():
    """A user's own Dataset: plain string texts and relation_text columns (None where a row has none)."""
    import datasets

    rows = [rec(id="a", split="train"), rec(id="b", subject="Ada Lovelace", answer="London", relation_text=None,
                                           storage=["Ada Lovelace was born in London"],
                                           query=["Where was Ada Lovelace born?\nAnswer: London"])]  # fmt: skip
    facts = load_facts(datasets.Dataset.from_list(rows))
    assert facts == load_facts(rows) and [f.split for f in facts] == ["train", None]
    assert roles(facts[1].storage[0])["relation"] == []
    bad = datasets.Dataset.from_list([rows[0], {**rows[1], "answer": "Paris"}])
    with pytest.raises(FactFormatError, match=r"^dataset, row 1 \(id 'b'\), storage\[0\]: field 'answer'"):
        load_facts(bad)
    with pytest.raises(FactFormatError, match="DatasetDict"):
        load_facts(datasets.DatasetDict({"train": bad}))


def test_require_and_equality():
    facts = load_facts([rec(id="a"), rec(id="b", query=[])])
    with pytest.raises(FactFormatError, match="fact 'b': field 'query': missing"):
        facts.require("storage", "query")
    assert facts.require("storage") is facts
    assert FactSet(list(facts), "x") == FactSet(list(facts), "y") != FactSet(list(facts)[:1])


# ---------------------------------------------------------------------------------------------------- BPE
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from mechrecall.loading import load_model

    folder = load_model("smollm2-135m-instruct", registry=ROOT / "checkpoints.yaml").location  # cached after the first
    return AutoTokenizer.from_pretrained(folder)


def test_every_text_of_the_file_tokenizes_into_its_roles_with_bpe(smollm2_tokenizer):
    """Multi-token subjects and answers: the subject / answer tokens spell exactly the subject / answer."""
    from mechrecall.tokenization import encode_example

    tok = smollm2_tokenizer
    facts = check_tokenization(load_facts(FACTS), tok, ("subject", "relation", "final"))
    multi = {"subject": 0, "answer": 0}
    for f in facts:
        for ex in (*f.storage, *f.query):
            enc = encode_example(tok, ex)
            answer = [enc.input_ids[i] for i in enc.roles["answer"]]
            assert tok.decode(answer).strip() == f.answer
            subject = tok.decode([enc.input_ids[i] for i in enc.roles["subject"]]).strip()
            assert subject == ex.text[slice(*ex.spans["subject"][0])]
            multi["subject"] += len(enc.roles["subject"]) > 1
            multi["answer"] += len(answer) > 1
            assert enc.prompt_len == len(tok(ex.prompt)["input_ids"])  # the prompt ends on a token boundary
    assert multi["subject"] >= 20 and multi["answer"] >= 20


def test_a_role_on_no_token_is_named(smollm2_tokenizer):
    from mechrecall.tokenization import RoleAlignmentError

    facts = load_facts([rec(id="x", relation_text=..., query=[])])
    with pytest.raises(RoleAlignmentError, match=r"fact 'x', storage\[0\] with the tokenizer of smol: role 'relation'"):
        check_tokenization(facts, smollm2_tokenizer, ("subject", "relation"), "smol")


def test_query_texts_in_a_chat_template_keep_their_roles():
    from mechrecall.tokenization import encode_example
    from tests.test_architectures import _facts, _tokenizer

    facts = _facts()
    tok = _tokenizer(facts)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    chat = facts.with_chat_template(tok)
    for old, new in zip(facts, chat):
        assert new.storage == old.storage
        q, q0 = new.query[0], old.query[0]
        assert q.text.startswith("<|user|> ") and q.text.endswith(f"</s> <|assistant|> {q0.answer}")
        for role, spans in q0.spans.items():
            got = [q.text[a:b] for a, b in q.spans[role]]
            assert got == [q0.text[a:b].lstrip() if role == "answer" else q0.text[a:b] for a, b in spans], role
        enc = encode_example(tok, q)
        assert enc.input_ids[-1] == tok.eos_token_id and len(enc.roles["subject"]) == 2
    with pytest.raises(ValueError, match="has no chat template"):
        facts.with_chat_template(_tokenizer(facts))


def test_a_chat_template_that_writes_bos_does_not_double_it():
    from mechrecall.tokenization import encode_example
    from tests.test_architectures import _facts, _tokenizer

    facts = _facts()
    tok = _tokenizer(facts)  # adds <s> itself
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    q = facts.with_chat_template(tok).facts[0].query[0]
    ids = list(encode_example(tok, q).input_ids)
    assert not q.text.startswith("<s>") and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_a_checkpoint_finds_its_own_facts_file_and_no_other_runs(tmp_path):
    from mechrecall.facts import checkpoint_facts, facts_file_name, subjects_first

    facts = load_facts(DATA / "facts.jsonl")
    run = tmp_path / "run"
    final = run / "mixed" / "final"
    final.mkdir(parents=True)
    (run / "data").mkdir()
    facts.to_jsonl(run / "data" / facts_file_name("abc"))
    assert checkpoint_facts(final, {"dataset_hash": "abc"}) == facts  # run/data/facts-<hash>.jsonl, two levels up
    with pytest.raises(FactFormatError, match="no facts file beside this checkpoint.*facts-xyz.jsonl.*--facts FILE"):
        checkpoint_facts(final, {"dataset_hash": "xyz"})  # another run's hash: never the file of another dataset
    with pytest.raises(FactFormatError, match="no facts file"):
        checkpoint_facts(final, {})  # not a training run's checkpoint, and no facts.jsonl of its own
    facts[:3].to_jsonl(final / "facts.jsonl")
    assert checkpoint_facts(final, {}) == facts[:3]  # a folder that brings its own
    first = subjects_first(facts, 2)
    assert len({f.subject for f in first}) == 2 and first.facts == [f for f in facts if f.subject in {
        f.subject for f in first}]  # fmt: skip
