import json

import pytest

from mechrecall.lab.bios import (
    ATTRIBUTES,
    QUERY_TEMPLATES,
    STORAGE_TEMPLATES,
    DataSpec,
    Person,
    biography,
    generate,
    query_example,
    render,
)


def test_generate_is_deterministic_and_seed_dependent():
    a, b, c = generate(DataSpec(n_people=50), 3), generate(DataSpec(n_people=50), 3), generate(DataSpec(n_people=50), 4)
    assert a.hash == b.hash and a.documents() == b.documents()
    assert a.hash != c.hash


def test_split_is_disjoint_and_sized():
    ds = generate(DataSpec(n_people=200, train_fraction=0.5, validation_fraction=0.1), 0)
    train, val, held = (set(ds.pids(s)) for s in ("train", "validation", "heldout"))
    assert not (train & val or train & held or val & held)
    assert (len(train), len(val), len(held)) == (100, 20, 80)
    assert train | val | held == set(range(200))


def test_names_unique_and_company_city_is_a_function_of_company():
    ds = generate(DataSpec(n_people=300), 1)
    assert len({p.name for p in ds.people}) == 300
    hq = {}
    for p in ds.people:
        assert hq.setdefault(p.attributes["company"], p.attributes["company_city"]) == p.attributes["company_city"]


@pytest.mark.parametrize("attribute", ATTRIBUTES)
@pytest.mark.parametrize("fmt", ["storage", "query"])
def test_every_template_spans_cover_the_right_text(attribute, fmt):
    person = Person(0, "Anya Forger", "She", {a: f"VALUE {a}" for a in ATTRIBUTES} | {"major": "Art History"})
    templates = STORAGE_TEMPLATES[attribute] if fmt == "storage" else QUERY_TEMPLATES[attribute]
    for t, template in enumerate(templates):
        if fmt == "query":
            ex = query_example(person, attribute, t)
            assert ex.text[slice(*ex.spans["cue"][0])] == "Answer:"
        else:
            text, spans = render(template, person.name, person.attributes[attribute], person.possessive)
            ex_spans = spans
            ex = None
        spans = ex.spans if ex is not None else ex_spans
        text = ex.text if ex is not None else text
        assert text[slice(*spans["subject"][0])] == "Anya Forger"
        assert text[slice(*spans["answer"][0])] == person.attributes[attribute]
        relation = " ".join(text[s:e] for s, e in spans["relation"])
        # the relation is exactly the template's own words, without subject, value, or punctuation
        expected = template.replace("{poss}", "her").replace("{subject}", " ").replace("{value}", " ")
        assert relation.split() == expected.replace("?", " ").replace(".", " ").split()


def test_biography_prefix_examples_and_pronouns():
    import random

    person = Person(3, "Kai Vance", "He", {a: f"v{i}" for i, a in enumerate(ATTRIBUTES)})
    bio = biography(person, random.Random(0), 5)
    for i, a in enumerate(ATTRIBUTES):
        ex = bio.facts[a]
        assert bio.text.startswith(ex.text) and ex.text.endswith(f"v{i}")
        assert ex.answer == f"v{i}"
        subj = ex.text[slice(*ex.spans["subject"][0])]
        assert subj == ("Kai Vance" if i == 0 else "He")
    full = biography(person, random.Random(0), 5, fullname=True)
    assert all(full.facts[a].text[slice(*full.facts[a].spans["subject"][0])] == "Kai Vance" for a in ATTRIBUTES)


def test_permute_keeps_name_first_and_all_facts():
    import random

    person = Person(0, "Kai Vance", "He", {a: f"v{i}" for i, a in enumerate(ATTRIBUTES)})
    bio = biography(person, random.Random(5), 5, permute=True)
    assert bio.text.startswith("Kai Vance")
    assert sorted(bio.facts) == sorted(ATTRIBUTES)


def test_jsonl_export_round_trips(tmp_path, micro_dataset):
    path = micro_dataset.to_jsonl(tmp_path / "d.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(micro_dataset.people) * len(ATTRIBUTES) * 2
    r = rows[0]
    start, end = r["spans"]["answer"][0]
    assert r["text"][start:end] == micro_dataset.people[r["subject_id"]].attributes[r["relation"]]
    assert {r["split"] for r in rows} == {"train", "validation", "heldout"}


def test_hf_dataset_export(micro_dataset):
    ds = micro_dataset.to_hf_dataset()
    assert len(ds) == len(micro_dataset.people) * len(ATTRIBUTES) * 2
    assert set(ds.column_names) >= {"text", "spans", "split", "format", "relation"}


def test_bad_split_fractions_are_rejected():
    with pytest.raises(ValueError, match="train_fraction"):
        generate(DataSpec(n_people=10, train_fraction=0.6, validation_fraction=0.5), 0)
