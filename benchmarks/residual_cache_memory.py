"""Peak memory of the streamed residual cache for 1k vs 10k facts (each size in its own fresh process).

    .venv/bin/python benchmarks/residual_cache_memory.py

Streaming writes a shard every --shard-size facts, so the peak RSS should barely grow with the number of facts;
the in-memory size the same states would take is printed beside it for scale.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def child(n: int, shard: int) -> None:
    from mechrecall.cache import cache_residuals
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import build_model
    from mechrecall.lab.tokenizer import train_tokenizer

    preset = get_preset("default")
    ds = generate(preset.data.spec(), 0)
    tok = train_tokenizer(ds)
    model = build_model(preset.model, tok, 0)
    base = ds.storage_examples()
    examples = (base * (n // len(base) + 1))[:n]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as d:
        cache_residuals(model, tok, examples, d, shard_size=shard, batch_size=64)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    states_mb = n * 3 * 3 * preset.model.n_layers * preset.model.d_model * 4 / 2**20
    print(
        json.dumps(
            {
                "facts": n,
                "rss_before_mb": before / 1024,
                "peak_rss_mb": peak / 1024,
                "states_if_in_memory_mb": states_mb,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--child", type=int, default=None)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.shard_size)
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--shard-size", str(args.shard_size)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    print(
        json.dumps(
            {
                "rows": rows,
                "peak_growth_mb": growth,
                "in_memory_growth_mb": rows[-1]["states_if_in_memory_mb"] - rows[0]["states_if_in_memory_mb"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
