"""Per-example gradients: torch.func vmap vs a per-example backward loop, same model, batch and run.

    .venv/bin/python benchmarks/per_example_grads.py [--batch 16] [--repeats 3]

Prints the median seconds of each and the ratio loop / vmap, and checks the two agree. Model: the default preset's
architecture at the default dataset's vocabulary, random weights (timing does not depend on training).
"""

import argparse
import json
import statistics
import time

import torch

from mechrecall.gradients import answer_batch, per_example_grads, per_example_grads_loop
from mechrecall.lab.bios import generate
from mechrecall.lab.config import get_preset
from mechrecall.lab.models import build_model
from mechrecall.lab.tokenizer import train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--format", default="storage", choices=["storage", "query"])
    args = ap.parse_args()
    preset = get_preset("default")
    ds = generate(preset.data.spec(), 0)
    tok = train_tokenizer(ds)
    model = build_model(preset.model, tok, 0)
    pids = ds.pids("heldout")
    ex = (ds.storage_examples(pids) if args.format == "storage" else ds.query_examples(pids))[: args.batch]
    batch = answer_batch(tok, ex)
    per_example_grads(model, batch)  # warm-up
    t_vmap, t_loop = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fast = per_example_grads(model, batch)
        t_vmap.append(time.perf_counter() - t)
        t = time.perf_counter()
        slow = per_example_grads_loop(model, batch)
        t_loop.append(time.perf_counter() - t)
    diff = max(float((fast[k] - slow[k]).abs().max()) for k in fast)
    out = {
        "batch": args.batch,
        "format": args.format,
        "threads": torch.get_num_threads(),
        "vmap_s": statistics.median(t_vmap),
        "loop_s": statistics.median(t_loop),
        "ratio_loop_over_vmap": statistics.median(t_loop) / statistics.median(t_vmap),
        "max_abs_diff": diff,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
