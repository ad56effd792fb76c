import pytest

from mechrecall.lab.bios import ATTRIBUTES, QUERY_TEMPLATES, STORAGE_TEMPLATES, Person, biography, query_example
from mechrecall.lab.tokenizer import train_tokenizer
from mechrecall.tokenization import RoleAlignmentError, encode_example


def _texts(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def test_single_token_names(micro_dataset, micro_tokenizer):
    for p in micro_dataset.people[:20]:
        assert len(micro_tokenizer(p.name, add_special_tokens=False)["input_ids"]) == 1


def test_multi_token_names(micro_dataset):
    tok = train_tokenizer(micro_dataset, "multi_token")
    assert all(len(tok(p.name, add_special_tokens=False)["input_ids"]) == 2 for p in micro_dataset.people[:20])


@pytest.mark.parametrize("name_style", ["single_token", "multi_token"])
def test_roles_land_on_the_right_tokens_for_every_template(micro_dataset, name_style):
    """For every storage and query template: subject, relation and answer tokens spell exactly their text."""
    import random

    tok = train_tokenizer(micro_dataset, name_style)
    person = micro_dataset.people[0]
    examples = []
    for a in ATTRIBUTES:
        examples += [query_example(person, a, t) for t in range(len(QUERY_TEMPLATES[a]))]
    for seed in range(40):  # enough draws to hit every storage template at every position
        examples += list(biography(person, random.Random(seed), len(STORAGE_TEMPLATES["major"])).facts.values())
    seen_templates = {(e.relation, e.template) for e in examples if e.format == "storage"}
    assert len(seen_templates) == sum(len(v) for v in STORAGE_TEMPLATES.values())
    for ex in examples:
        enc = encode_example(tok, ex)
        ids = enc.input_ids
        assert _texts(tok, [ids[i] for i in enc.roles["answer"]]) == tok.tokenize(ex.answer)
        subj = ex.text[slice(*ex.spans["subject"][-1])]
        assert _texts(tok, [ids[i] for i in enc.roles["subject"]][-len(tok.tokenize(subj)) :]) == tok.tokenize(subj)
        rel = " ".join(ex.text[s:e] for s, e in ex.spans["relation"])
        assert _texts(tok, [ids[i] for i in enc.roles["relation"]]) == tok.tokenize(rel)
        assert enc.prompt_len == enc.roles["answer"][0]
        assert enc.last("final") == enc.prompt_len - 1
        if ex.format == "query":
            assert ids[-1] == tok.eos_token_id and enc.answer_positions[-1] == len(ids) - 1


def test_unlocatable_role_is_a_clear_error(micro_tokenizer):
    from mechrecall.facts import Example

    ex = Example(0, "major", "query", "What? Answer: X", {"subject": ((50, 60),), "answer": ((14, 15),)}, 0)
    with pytest.raises(RoleAlignmentError, match="What\\? Answer: X"):
        encode_example(micro_tokenizer, ex)


def test_pretrained_style_bpe_tokenizer_offsets():
    """The same role resolution works with a byte-level BPE tokenizer (leading-space tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    person = Person(0, "Anya Forger", "She", {a: "Princeton, NJ" for a in ATTRIBUTES})
    texts = [query_example(person, a).text for a in ATTRIBUTES] * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    ex = query_example(person, "birth_city")
    enc = encode_example(tok, ex)
    answer = tok.decode([enc.input_ids[i] for i in enc.roles["answer"]])
    assert answer.strip() == "Princeton, NJ"
    assert tok.decode(list(enc.input_ids[: enc.prompt_len])).endswith("Answer:")
