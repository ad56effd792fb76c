"""Training throughput: tokens per second of the trainer's optimizer step, against this machine's matmul rate.

    .venv/bin/python benchmarks/train_throughput.py [--model lab smollm2] [--steps 6] [--device cpu]

For each model, times the lab trainer's own step (``mechrecall.lab.train._optimizer_step``: one storage and one query
batch of the micro dataset, each format back-propagated separately for the gradient trace, AdamW) after a warm-up
step, with the trace on and off, and untraced with vocabulary logits at the scored positions only (the
``scored_logits`` preset option; ``scored_logits_speedup`` is its tokens per second over the full-logits step's), and
in float32 the untraced steps again under bf16 autocast (``train --autocast bf16``: float32 weights, optimizer and loss;
``bf16_autocast_speedup`` over the float32 step, ``bf16_autocast_scored_speedup`` the same with scored logits).
Reports tokens per second (every position of the padded batches, and the scored ones)
and the model-FLOP utilisation: the step's matrix-product FLOPs per second (forward + backward: ``6 x block
parameters x tokens`` plus ``6 x vocabulary x d_model`` at every position whose logits are computed; the input
embedding is a lookup and costs none; attention scores left out) over the rate of a large float32 matrix multiply
measured in the same run on the same device (``torch.mm`` of two 2048 x 2048 matrices). ``mfu_6nd`` is the usual
``6 x all parameters x tokens`` approximation, kept for comparison: it counts the embedding as matrix work, which
overstates the utilisation of a model whose vocabulary is most of its parameters (gemma-3-270m: 63 %). On a GPU
the same script measures there (``--device cuda``, ``--dtype``).
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
from _models import CHOICES  # noqa: E402


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an ``n x n`` matrix product on ``device`` (median of ``repeats``)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(model, tokenizer, device, steps: int, batch: int, trace: bool, scored_logits: bool = False,
         autocast: torch.dtype | None = None) -> dict:  # fmt: skip
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.trace import GradientTrace
    from mechrecall.lab.train import StageConfig, TrainingData, _optimizer_step, _Run, _step_batches

    preset = get_preset("micro", [f"scored_logits={str(scored_logits).lower()}"])
    ds = generate(preset.data.spec(), 0)
    data = TrainingData.build(ds, tokenizer)
    cfg = StageConfig(steps=steps + 1, lr=1e-4, batch_storage=batch, batch_query=batch)
    run = _Run(preset, "mixed", Path("."), ds, tokenizer, data, model, {"global_step": 0}, 0.0,
               GradientTrace() if trace else None)  # fmt: skip
    run.device, run.autocast = device, autocast
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    seconds, tokens, scored, logit_rows = [], 0, 0, 0
    for step in range(steps + 1):
        batches = {f: b.to(device) for f, b in _step_batches(run, cfg, 0, step).items()}
        _sync(device)
        t = time.perf_counter()
        _optimizer_step(run, opt, cfg, "mixed", step, batches, ())
        _sync(device)
        if step:  # the first step warms up allocators and kernels
            seconds.append(time.perf_counter() - t)
            tokens += sum(b.input_ids.numel() for b in batches.values())
            n_scored = sum(int((b.labels != -100).sum()) for b in batches.values())
            scored += n_scored
            logit_rows += n_scored if scored_logits else sum(b.input_ids.numel() for b in batches.values())
    total = sum(seconds)
    return {"steps": steps, "seconds": total, "tokens_per_s": tokens / total, "scored_tokens_per_s": scored / total,
            "logit_rows_per_s": logit_rows / total}  # fmt: skip


def matmul_sizes(model) -> tuple[int, int]:
    """(parameters of the decoder blocks and final norm, vocabulary x d_model of the unembedding): the embedding
    table is a lookup; the unembedding's matrix counts only where logits are computed, tied or not."""
    from mechrecall import arch

    emb = arch.embedding(model).weight
    head = arch.unembed(model).weight
    total = sum(p.numel() for p in model.parameters())
    blocks = total - emb.numel() - (0 if head is emb else head.numel())
    return blocks, head.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["lab", "smollm2"], choices=CHOICES)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="rows per format per step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from _models import get

    from mechrecall.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    peak = matmul_rate(device, dtype)
    out = {"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(), "matmul_flops": peak}
    peak_bf16 = None
    if dtype == torch.float32:  # the autocast rows' utilisation is against the bf16 matmul rate
        peak_bf16 = out["matmul_flops_bf16"] = matmul_rate(device, torch.bfloat16)
    for name in args.model:
        lm = get(name)
        if lm.tokenizer.pad_token_id is None:
            lm.tokenizer.pad_token = lm.tokenizer.eos_token
        model = lm.model.to(device, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        n_blocks, n_unembed = matmul_sizes(model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rows = {}
        variants = [("untraced", False, False, None), ("traced", True, False, None),
                    ("untraced_scored_logits", False, True, None)]  # fmt: skip
        if dtype == torch.float32:  # bf16 autocast (float32 weights, optimizer and loss), as train --autocast bf16
            variants += [("untraced_bf16_autocast", False, False, torch.bfloat16),
                         ("untraced_scored_logits_bf16_autocast", False, True, torch.bfloat16)]  # fmt: skip
        for label, trace, scored, amp in variants:
            model.load_state_dict(state)
            r = _run(model, lm.tokenizer, device, args.steps, args.batch, trace, scored, amp)
            rate = peak_bf16 if amp is not None else peak
            r["mfu"] = 6 * (n_blocks * r["tokens_per_s"] + n_unembed * r["logit_rows_per_s"]) / rate
            r["mfu_6nd"] = 6 * n_params * r["tokens_per_s"] / rate
            rows[label] = r
        rows["scored_logits_speedup"] = (
            rows["untraced_scored_logits"]["tokens_per_s"] / rows["untraced"]["tokens_per_s"]
        )
        if "untraced_bf16_autocast" in rows:  # bf16 autocast over float32, same step, same run
            rows["bf16_autocast_speedup"] = (
                rows["untraced_bf16_autocast"]["tokens_per_s"] / rows["untraced"]["tokens_per_s"]
            )
            rows["bf16_autocast_scored_speedup"] = (
                rows["untraced_scored_logits_bf16_autocast"]["tokens_per_s"]
                / rows["untraced_scored_logits"]["tokens_per_s"]
            )
        out[name] = {"parameters": n_params, "block_parameters": n_blocks, "unembedding_parameters": n_unembed, **rows}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
