"""Every analysis at three model sizes: peak resident memory and wall time, float32 and bf16, on this machine.

    .venv/bin/python benchmarks/scale.py [--models smollm2 gemma3-270m pythia-1b-shape] [--dtypes float32 bf16]
        [--analyses cache consistency masks patching attribution] [--facts 32] [--out runs/bench/scale.json]

Each (model, dtype, analysis) runs in a fresh process (so that one's peak does not hide the next's) on the 32 facts
of ``tests/data/facts.jsonl`` with the model's tokenizer:

- ``cache``: residual states at the subject / relation / final roles of every storage and query text;
- ``consistency``: exact gradient consistency of ``--facts`` facts, streamed (at most three gradients held);
- ``consistency_sketch``: the same estimated from 16,384-bucket CountSketches (memory: the model and its buffers),
  with its largest per-fact error against the exact cosines when both ran;
- ``masks``: post-hoc importance (mean |per-example gradient|) of the storage and the query texts, streamed;
- ``patching``: cross-format activation patching of the residual stream at every layer and role, 16 pairs;
- ``attribution``: integrated gradients (16 steps, doubling to at most 64), gradient x input and occlusion, 8 facts.

Reported per row: ``loaded_mb`` (resident memory after loading the model), ``load_peak_mb`` (the peak while loading),
``peak_mb`` (the peak during the analysis: the peak is reset after loading where Linux allows, ``peak_reset``; before
that reset existed, a bf16 model built in float32 hid the analysis under its loading peak), ``analysis_mb`` = peak -
loaded, ``seconds``, and per parameter ``analysis_bytes_per_param``, the figure used to
extrapolate to larger models. ``pythia-1b-shape`` is a GPT-NeoX with Pythia-1B's published sizes (16 layers,
d 2048, 8 heads, MLP 8192, rotary 25 %, parallel residual; vocabulary 50,304) built offline with random weights and
SmolLM2's tokenizer (its ids fit the vocabulary); timings and memory do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from mechrecall.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ("cache", "consistency", "consistency_sketch", "masks", "patching", "attribution")
MODELS = ("smollm2", "gemma3-270m", "pythia-1b-shape", "lab")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the process's peak resident memory (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``), so that the
    analysis' peak is not the loading's (building a model in float32 before casting it to bf16 peaks higher than
    anything after). False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak resident memory since the last :func:`_reset_peak` (VmHWM), else since the process began."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (Linux: kilobytes)


def _load(name: str, dtype: str):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _models import get

    from mechrecall.devices import resolve_dtype
    from mechrecall.loading import LoadedModel, load_model

    if name == "pythia-1b-shape":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        tok = load_model("smollm2-135m-instruct").tokenizer
        cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                            intermediate_size=8192, rotary_pct=0.25, use_parallel_residual=True,
                            max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
        torch.manual_seed(0)
        lm = LoadedModel(GPTNeoXForCausalLM(cfg).eval(), tok, "pythia-1b-shape (random init)", "-")
    else:
        lm = get(name)
    lm.model.to(resolve_dtype(dtype))
    return lm


def _child(name: str, dtype: str, analysis: str, n_facts: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from mechrecall.facts import load_facts

    torch.set_num_threads(torch.get_num_threads())
    before = _rss_mb()
    lm = _load(name, dtype)
    model, tok = lm.model, lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    facts = load_facts(ROOT / "tests" / "data" / "facts.jsonl")[:n_facts]
    loaded = _rss_mb()
    load_peak = _peak_mb()
    reset = _reset_peak()
    t0 = time.perf_counter()
    extra: dict = {}
    if analysis == "cache":
        from mechrecall.cache import cache_residuals

        cache_residuals(model, tok, facts.examples("storage") + facts.examples("query"), batch_size=8)
    elif analysis in ("consistency", "consistency_sketch"):
        from mechrecall.consistency import streamed_gradient_consistency

        s, q = facts.examples("storage", templates=[0]), facts.examples("query", templates=[0])
        sketch = 16384 if analysis == "consistency_sketch" else None
        r = streamed_gradient_consistency(model, tok, s, q, batch_size=16, streamed=True, sketch_dim=sketch)
        extra["all_same_fact_cos"] = r[0].same.tolist()
        extra["all_mismatched_cos"] = r[0].mismatched.tolist()
    elif analysis == "masks":
        from mechrecall.gradients import gradient_stats

        for fmt in ("storage", "query"):
            gradient_stats(model, tok, facts.examples(fmt, templates=[0]), batch_size=8, streamed=True)
    elif analysis == "patching":
        from mechrecall.patching import activation_patch, fact_pairs

        base, source, _ = fact_pairs(facts, tok, n=16)
        activation_patch(model, base, source, site="resid_pre", metric="logit_diff")
    elif analysis == "attribution":
        from mechrecall.attribution import attribute

        attribute(model, tok, facts.examples("storage", templates=[0])[:8], steps=16, max_steps=64)
    seconds = time.perf_counter() - t0
    peak = _peak_mb()
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": name, "dtype": dtype, "analysis": analysis, "parameters": n_params, "start_mb": before,
            "loaded_mb": loaded, "load_peak_mb": load_peak, "peak_reset": reset, "peak_mb": peak,
            "analysis_mb": peak - loaded, "seconds": seconds,
            "analysis_bytes_per_param": (peak - loaded) * 2**20 / n_params, **extra}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS[:3]), choices=MODELS)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bf16"])
    ap.add_argument("--analyses", nargs="+", default=list(ANALYSES), choices=ANALYSES)
    ap.add_argument("--facts", type=int, default=32)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.facts)))
        return
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            for analysis in args.analyses:
                cmd = [sys.executable, __file__, "--child", name, dtype, analysis, "--facts", str(args.facts)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    row = {"model": name, "dtype": dtype, "analysis": analysis, "error": r.stderr.strip()[-400:]}
                else:
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                shown = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                         if not k.startswith("all_")}  # fmt: skip
                print(json.dumps(shown), flush=True)
                if args.out:  # after every row: a long run stopped midway keeps what it measured
                    atomic_write_text(Path(args.out), json.dumps(rows, indent=2) + "\n")
    by = {(r["model"], r["dtype"]): r for r in rows if r.get("analysis") == "consistency" and "error" not in r}
    for r in rows:  # the sketch's error against the exact cosines of the same model and dtype
        exact = by.get((r["model"], r["dtype"]))
        if r.get("analysis") == "consistency_sketch" and "error" not in r and exact is not None:
            errs = [abs(a - b) for k in ("all_same_fact_cos", "all_mismatched_cos") for a, b in zip(r[k], exact[k])]
            r["sketch_max_abs_error"] = max(errs)
            print(f"{r['model']} {r['dtype']}: sketch max |error| {r['sketch_max_abs_error']:.4f}", flush=True)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
