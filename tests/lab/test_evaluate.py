import torch

from mechrecall.lab.config import get_preset
from mechrecall.lab.evaluate import evaluate, query_recall, storage_recall
from mechrecall.lab.models import build_model
from mechrecall.tokenization import encode_example


class _Oracle(torch.nn.Module):
    """A fake LM that predicts a fixed next token per (row content, position), to test scoring logic exactly."""

    def __init__(self, vocab, answers):
        super().__init__()
        self.vocab, self.answers = vocab, answers  # tuple(ids) -> next-token list

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            n = int(attention_mask[i].sum()) if attention_mask is not None else t
            seq = tuple(input_ids[i, :n].tolist())
            for j, nxt in enumerate(self.answers(seq)):
                logits[i, j, nxt] = 1.0
        return type("Out", (), {"logits": logits})()


def test_teacher_forced_exact_match_equals_greedy_generation(micro_dataset, micro_tokenizer):
    """Scoring says 'correct' exactly when greedy decoding from the prompt emits the answer and then stops."""
    torch.manual_seed(0)
    model = build_model(get_preset("micro").model, micro_tokenizer, seed=0)
    # train briefly on a few QA pairs so that some, not all, are recalled
    examples = micro_dataset.query_examples(micro_dataset.pids("train")[:8])
    enc = [encode_example(micro_tokenizer, ex) for ex in examples]
    from mechrecall.lab.train import lm_loss
    from mechrecall.tokenization import collate_examples

    batch = collate_examples(enc, micro_tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    scored = query_recall(model, micro_tokenizer, micro_dataset, examples).correct
    greedy = []
    for e in enc:
        prompt = torch.tensor([e.input_ids[: e.prompt_len]])
        n_new = len(e.answer_positions)
        out = model.generate(prompt, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        greedy.append(out[0, e.prompt_len :].tolist() == list(e.input_ids[e.prompt_len :]))
    assert scored.tolist() == greedy
    assert 0 < sum(greedy) < len(greedy)  # the check saw both outcomes


def test_storage_recall_scores_each_attribute_inside_the_biography(micro_dataset, micro_tokenizer):
    """With an oracle that knows every biography except one attribute value, exactly that fact is wrong."""
    from mechrecall.lab.evaluate import encode_biography

    bios = {}
    for p in micro_dataset.people[:5]:
        ids, pos = encode_biography(micro_tokenizer, micro_dataset.bios[p.pid][0])
        bios[tuple(ids)] = (ids, pos, p.pid)

    def answers(seq):
        ids, pos, pid = bios[seq]
        nxt = list(ids[1:]) + [0]
        if pid == 2:  # get the first token of major wrong
            j = pos["major"][0]
            nxt[j - 1] = (nxt[j - 1] + 1) % len(micro_tokenizer)
        return nxt

    oracle = _Oracle(len(micro_tokenizer), answers)
    rec = storage_recall(oracle, micro_tokenizer, micro_dataset, pids=[p.pid for p in micro_dataset.people[:5]])
    df = rec.to_dataframe()
    wrong = df[~df.correct]
    assert list(zip(wrong.person_id, wrong.attribute)) == [(2, "major")]


def test_evaluate_reports_every_split_and_attribute(micro_dataset, micro_tokenizer):
    model = build_model(get_preset("micro").model, micro_tokenizer, seed=0)
    m = evaluate(model, micro_tokenizer, micro_dataset)
    assert {"trained_qa", "validation_qa", "heldout_qa", "storage"} <= m.keys()
    assert all(0.0 <= m[k] <= 1.0 for k in ("trained_qa", "heldout_qa", "storage"))
    assert set(m["per_attribute"]["heldout_qa"]) == {
        "birth_date",
        "birth_city",
        "university",
        "major",
        "company",
        "company_city",
    }


def test_evaluate_reports_each_splits_mean_answer_nll(micro_dataset, micro_tokenizer):
    """``{split}_qa_nll`` is the mean over that split's questions of the answer's negative log-likelihood."""
    from mechrecall.recall import answer_scores

    model = build_model(get_preset("micro").model, micro_tokenizer, seed=0)
    m = evaluate(model, micro_tokenizer, micro_dataset, storage=False)
    for split, key in (("train", "trained_qa"), ("validation", "validation_qa"), ("heldout", "heldout_qa")):
        nll = answer_scores(model, micro_tokenizer, micro_dataset.query_examples(micro_dataset.pids(split))).nll
        assert abs(m[f"{key}_nll"] - float(nll.mean())) < 1e-4
    assert m["validation_qa_nll"] > 0
