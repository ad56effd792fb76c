"""Integrated gradients one quadrature step a forward against (step, example) rows batched together, same run.

    .venv/bin/python benchmarks/ig_batching.py [--model smollm2] [--facts 8] [--steps 16] [--repeats 2]

``mechrecall.attribution.integrated_gradients`` flattens its (step, example) pairs into forwards of ``batch_size``
rows. With ``batch_size`` equal to the number of facts each forward holds one step's examples, which is what the
function did before it batched steps; with 64 it holds eight steps' worth of 8 facts. Reports the seconds of each
(best of ``--repeats``, alternating) and the largest difference between their attributions (they are the same sum in
another order). Peak memory of the whole attribution at the default is ``benchmarks/scale.py --analyses attribution``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _models import CHOICES, get

    from mechrecall.attribution import integrated_gradients, role_inputs
    from mechrecall.facts import load_facts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=CHOICES)
    ap.add_argument("--facts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lm = get(args.model)
    model, tok = lm.model.eval(), lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    facts = load_facts(ROOT / "tests" / "data" / "facts.jsonl")
    inputs = role_inputs(tok, facts.examples("storage", templates=[0])[: args.facts])
    seconds: dict[int, list[float]] = {args.facts: [], 64: []}
    results = {}
    for _ in range(args.repeats):
        for bs in seconds:
            t0 = time.perf_counter()
            results[bs] = integrated_gradients(model, inputs, steps=args.steps, max_steps=args.steps, batch_size=bs)
            seconds[bs].append(time.perf_counter() - t0)
    one, many = min(seconds[args.facts]), min(seconds[64])
    diff = float((results[args.facts].attributions - results[64].attributions).abs().max())
    print(json.dumps({"model": args.model, "facts": args.facts, "steps": args.steps, "threads": torch.get_num_threads(),
                      "one_step_a_forward_s": one, "batched_64_rows_s": many, "speedup": one / many,
                      "max_abs_attribution_diff": diff}))  # fmt: skip


if __name__ == "__main__":
    main()
