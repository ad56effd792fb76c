"""Exact-match scoring: vocabulary logits at the answer positions only, against the whole forward's logits.

    .venv/bin/python benchmarks/recall_scoring.py [--model smollm2 lab] [--people 100] [--repeats 3] [--device cpu]

``mechrecall.recall.correct_answers`` runs the decoder stack and applies the unembedding only where an answer token
is scored (a handful of positions per QA row); the baseline is what it did before: ``model(...).logits`` for every
position, then the argmax. Both are timed on the same QA batches of the lab's multi-token dataset in the same run
(median of ``--repeats``); the hits must be identical. Reports seconds, the ratio and the peak size of the logits
tensor each holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _baseline(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    target = batch.labels[:, 1:]
    out = torch.ones_like(batch.labels, dtype=torch.bool)
    out[:, 1:] = (logits[:, :-1].argmax(-1) == target) | (target == -100)
    return out, logits.numel() * logits.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["smollm2", "lab"], choices=["lab", "smollm2", "pythia-70m-shape"])
    ap.add_argument("--people", type=int, default=100)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from _models import get

    from mechrecall.devices import resolve_device
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import DataConfig
    from mechrecall.recall import correct_answers
    from mechrecall.tokenization import collate_examples, encode_example

    device = resolve_device(args.device)
    ds = generate(DataConfig(n_people=args.people, name_style="multi_token").spec(), 0)
    out = {"device": str(device), "threads": torch.get_num_threads(), "people": args.people}
    for name in args.model:
        lm = get(name)
        tok = lm.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if name == "lab":  # its word-level tokenizer knows single-token names only: its own dataset
            from mechrecall.lab.config import get_preset

            ds_m = generate(get_preset("default").data.spec(), 0)
        else:
            ds_m = ds
        examples = ds_m.query_examples()[: args.batch]
        batch = collate_examples([encode_example(tok, ex) for ex in examples], tok.pad_token_id).to(device)
        model = lm.model.to(device).eval()
        times = {"scored_positions": [], "whole_logits": []}
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                t = time.perf_counter()
                fast = correct_answers(model, batch)
                times["scored_positions"].append(time.perf_counter() - t)
                t = time.perf_counter()
                slow, nbytes = _baseline(model, batch)
                times["whole_logits"].append(time.perf_counter() - t)
        assert torch.equal(fast, slow), "the two scorings disagree"
        med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round warms up
        scored = int((batch.labels[:, 1:] != -100).sum())
        out[name] = {
            "rows": len(examples),
            "positions": int(batch.input_ids.numel()),
            "scored": scored,
            "seconds": med,
            "speedup": med["whole_logits"] / med["scored_positions"],
            "whole_logits_bytes": nbytes,
            "scored_logits_bytes": scored * len(tok) * 4,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
