"""Overhead of the per-format gradient trace (on by default): mixed training with and without it, same run.

    .venv/bin/python benchmarks/trace_overhead.py [--steps 60] [--repeats 2]

Trains the default preset's mixed regime for --steps steps (no evaluation, no checkpoints) with ``trace=false`` and
``trace=true``, alternating, and prints the median seconds of each and the ratio traced / untraced.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from mechrecall.lab.config import get_preset
from mechrecall.lab.train import prepare_data, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    common = [f"mixed.steps={args.steps}", f"mixed.eval_every={10 * args.steps}", f"save_every={10 * args.steps}"]
    times: dict[str, list[float]] = {"untraced": [], "traced": []}
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(get_preset("default"), tmp)  # data and tokenizer once, outside the timings
        for _ in range(args.repeats):
            for label, flag in (("untraced", "false"), ("traced", "true")):
                preset = get_preset("default", [*common, f"trace={flag}"])
                t = time.perf_counter()
                train(preset, "mixed", tmp, resume=False, progress=False)
                times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "untraced_s": med["untraced"],
                "traced_s": med["traced"],
                "ratio_traced_over_untraced": med["traced"] / med["untraced"],
                "note": "each timing includes one final evaluation of every split (the same in both)",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
