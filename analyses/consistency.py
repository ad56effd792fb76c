"""Gradient and representation consistency of checkpoints (the paper's findings 1 and 2).

    python analyses/consistency.py --checkpoints default-s0-two-stage default-s0-mixed --out runs/default/consistency
    python analyses/consistency.py --trajectory runs/default/seed0 --out runs/default/consistency
    python analyses/consistency.py --checkpoints smollm2-135m-instruct --facts tests/data/facts.jsonl \\
        --grad-facts 4 --out runs/smollm2

Writes OUT/consistency.json and OUT/consistency.html (or, with --trajectory, the same measures on every checkpoint
saved during training: OUT/consistency_trajectory.{json,html}). Facts: the held-out people of the dataset a lab
checkpoint was trained on, or with --facts FILE your own facts on any checkpoints (registry name, folder, Hugging
Face id, .gguf). Per-example gradients of every parameter are compared in batches of 2 to 16 facts, as many as
fit 2 GiB of gradients (a function of the model alone: 16 for the lab models, 2 for SmolLM2-135M); --grad-batch
sets it (memory about 2 x 4 bytes x parameters x grad-batch, and vmap's intermediates about as much again).
"""

import argparse
import sys

from mechrecall.cli import Parser, add_model_args, at_least, positive_int, run_cli
from mechrecall.report.consistency import run, trajectory


def parser() -> argparse.ArgumentParser:
    ap = Parser(description=__doc__)
    ap.add_argument("--checkpoints", nargs="+", help="registry names, folders, HF ids or .gguf files")
    ap.add_argument("--trajectory", default=None, help="a run folder of one seed: measure every saved checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--registry", default=None)
    ap.add_argument("--facts", default=None, metavar="FILE", help="your own facts (.jsonl / .json; mechrecall.facts)")
    ap.add_argument("--split", default=None, help="with --facts: only facts of this split (default: all)")
    ap.add_argument("--labels", nargs="+", default=None, help="names for the checkpoints in the JSON and figures")
    ap.add_argument("--people", "--count", dest="people", type=positive_int, default=200,
                    help="held-out people, or with --facts the first facts, to use (default 200)")  # fmt: skip
    ap.add_argument("--grad-facts", type=at_least(2), default=240)
    ap.add_argument("--grad-batch", type=at_least(2), default=None,
                    help="facts per per-example-gradient batch (default: by model size; memory ~ 4 x this x 4 "
                         "bytes x parameters; >= 2)")  # fmt: skip
    ap.add_argument("--grad-sketch", type=positive_int, default=None, metavar="K",
                    help="estimate gradient cosines from K-bucket CountSketches (memory: the model and its gradient "
                         "buffers; error about 1/sqrt(K)) for models where three gradients do not fit")  # fmt: skip
    ap.add_argument("--no-parity", action="store_true", help="skip the TransformerLens / nnsight logit checks")
    add_model_args(ap)
    return ap


def _main(args) -> int:
    if args.trajectory:
        result = trajectory(
            args.trajectory, args.out, n_people=min(args.people, 50), grad_facts=min(args.grad_facts, 60)
        )
        for regime, pts in result["curves"].items():
            for p in pts:
                print(
                    f"{regime} step {p['global_step']:5d} ({p['stage']}): grad cos {p['gradient_cos']:.3f} final margin {p['final_margin']:.3f}"
                )
        return 0
    result = run(
        args.checkpoints, args.out, registry=args.registry, n_people=args.people, grad_facts=args.grad_facts,
        grad_batch=args.grad_batch, grad_sketch=args.grad_sketch,
        labels=args.labels, facts=args.facts, split=args.split, device=args.device, dtype=args.dtype,
        parity=not args.no_parity,
    )  # fmt: skip
    for name, g in result["gradient"].items():
        rep = result["representation"][name]
        print(
            f"{name}: grad cos {g['same_fact_mean_cos']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}] "
            f"(mismatched {g['baseline_mean_cos']:.3f}); subject margin (last layer) {rep['subject_last_layer_margin']:.3f}; "
            f"final margin {rep['final_last_layer_margin']:.3f}; probe {rep['probe_storage_to_query']['test_accuracy']:.3f}"
        )
    return 0


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if not args.trajectory and not args.checkpoints:
        ap.error("give --checkpoints or --trajectory")
    return run_cli(_main, args)


if __name__ == "__main__":
    sys.exit(main())
