"""Gradient and representation consistency of registered checkpoints (the paper's findings 1 and 2).

    python analyses/consistency.py --checkpoints default-s0-two-stage default-s0-mixed --out runs/default/consistency
    python analyses/consistency.py --trajectory runs/default/seed0 --out runs/default/consistency

Writes OUT/consistency.json and OUT/consistency.html (or, with --trajectory, the same measures on every checkpoint
saved during training: OUT/consistency_trajectory.{json,html}). Facts: the held-out people of the dataset.
"""

import argparse
import sys

from mechrecall.report.consistency import run, trajectory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", help="registry names or folders (one per regime)")
    ap.add_argument("--trajectory", default=None, help="a run folder of one seed: measure every saved checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--registry", default=None)
    ap.add_argument("--people", type=int, default=200, help="held-out people to use")
    ap.add_argument("--grad-facts", type=int, default=240)
    args = ap.parse_args(argv)
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
    if not args.checkpoints:
        ap.error("give --checkpoints or --trajectory")
    result = run(args.checkpoints, args.out, registry=args.registry, n_people=args.people, grad_facts=args.grad_facts)
    for name, g in result["gradient"].items():
        rep = result["representation"][name]
        print(
            f"{name}: grad cos {g['heldout_mean_cos']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}] "
            f"(mismatched {g['baseline_mean_cos']:.3f}); subject margin (last layer) {rep['subject_last_layer_margin']:.3f}; "
            f"final margin {rep['final_last_layer_margin']:.3f}; probe {rep['probe_storage_to_query']['test_accuracy']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
