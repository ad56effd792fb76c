"""Per-example gradients: torch.func vmap vs a per-example backward loop (plain HF) vs the same loop through a
TransformerLens bridge, same model, batch and run.

    .venv/bin/python benchmarks/per_example_grads.py [--model lab|smollm2|pythia-70m-shape] [--batch 16] [--repeats 3]

Prints the median seconds of each, the ratios loop / vmap and TL loop / vmap, and checks that all three agree. Batch:
random token sequences of ``--pos`` tokens whose last 3 tokens are scored (the answer loss's shape); with ``--model
lab`` the default dataset's storage facts instead. Parameters: every block's (``--params blocks``, default) or all.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from _models import CHOICES, get

from mechrecall import arch
from mechrecall.gradients import answer_batch, per_example_grads, per_example_grads_loop, select_params
from mechrecall.loading import hf_name, to_transformer_lens
from mechrecall.tokenization import Batch


def _batch(loaded, n: int, pos: int) -> Batch:
    if loaded.source.startswith("default"):
        from mechrecall.lab.bios import generate
        from mechrecall.lab.config import get_preset

        ds = generate(get_preset("default").data.spec(), 0)
        return answer_batch(loaded.tokenizer, ds.storage_examples(ds.pids("heldout"))[:n])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, arch.dims(loaded.model).vocab, (n, pos), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    return Batch(ids, torch.ones_like(ids), labels)


def _tl_loop(bridge, batch: Batch, names: list[str]) -> dict[str, torch.Tensor]:
    """One backward per example through the bridge; gradients read back under HF names."""
    params = {hf_name(n): p for n, p in bridge.named_parameters()}
    names = [n for n in names if n in params]  # TL's GPT-NeoX adapter splits the fused QKV into its own parameters
    out: dict[str, list] = {n: [] for n in names}
    for i in range(len(batch)):
        bridge.zero_grad(set_to_none=True)
        row = batch.index(torch.tensor([i]))
        logits = bridge(row.input_ids, return_type="logits")
        F.cross_entropy(logits[0, :-1], row.labels[0, 1:], ignore_index=-100).backward()
        for n in names:
            g = params[n].grad
            out[n].append(torch.zeros_like(params[n]) if g is None else g.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=CHOICES, default="lab")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pos", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--params", choices=["blocks", "all"], default="blocks")
    args = ap.parse_args()
    loaded = get(args.model)
    model = loaded.model
    batch = _batch(loaded, args.batch, args.pos)
    include = None if args.params == "all" else (lambda n: arch.layer_of(n, model) is not None)
    params = select_params(model, include)
    bridge = to_transformer_lens(loaded)
    per_example_grads(model, batch, params)  # warm-up
    t_vmap, t_loop, t_tl = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fast = per_example_grads(model, batch, params)
        t_vmap.append(time.perf_counter() - t)
        t = time.perf_counter()
        slow = per_example_grads_loop(model, batch, params)
        t_loop.append(time.perf_counter() - t)
        t = time.perf_counter()
        tl = _tl_loop(bridge, batch, list(params))
        t_tl.append(time.perf_counter() - t)
    out = {
        "model": loaded.source,
        "architecture": arch.spec_of(model).name,
        "batch": args.batch,
        "params": args.params,
        "n_params": sum(p.numel() for p in params.values()),
        "threads": torch.get_num_threads(),
        "vmap_s": statistics.median(t_vmap),
        "loop_s": statistics.median(t_loop),
        "transformer_lens_loop_s": statistics.median(t_tl),
        "ratio_loop_over_vmap": statistics.median(t_loop) / statistics.median(t_vmap),
        "ratio_tl_loop_over_vmap": statistics.median(t_tl) / statistics.median(t_vmap),
        "max_abs_diff_loop": max(float((fast[k] - slow[k]).abs().max()) for k in fast),
        "max_abs_diff_tl": max(float((fast[k] - tl[k]).abs().max()) for k in tl),
        "tl_compared_params": f"{len(tl)} of {len(fast)} (the rest have no HF-named counterpart in the bridge)",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
