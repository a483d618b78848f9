"""The `meta-kernels` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import meta_kernels as mk
    print(json.dumps(mk.backend_info(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from meta_kernels.demo import run_demo
    s = run_demo(args.out, outer_steps=args.steps, meta_batch_size=args.meta_batch, seed=args.seed)
    b, a = s["heldout_mse_by_inner_step_before_meta_training"], s["heldout_mse_by_inner_step_after_meta_training"]
    print(f"sinusoid MAML: {s['outer_steps']} outer steps x {s['meta_batch_size']} tasks in {s['train_seconds']} s")
    print(f"held-out query MSE (100 tasks, {s['k_shot']}-shot):")
    print(f"  before meta-training: {b[0]:.3f} -> {b[1]:.3f} after 1 step -> {b[10]:.3f} after 10 steps")
    print(f"  after  meta-training: {a[0]:.3f} -> {a[1]:.3f} after 1 step -> {a[10]:.3f} after 10 steps")
    print(f"wrote {args.out}/metrics.json, metrics.jsonl and sinusoid.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meta-kernels", description="Meta-learning on fused inner-loop kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what was built and which backend runs where")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="meta-train sinusoid regression (no download, about a minute on a CPU)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=4000, help="outer steps (default 4000)")
    demo.add_argument("--meta-batch", type=int, default=25, help="tasks per outer step (default 25)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as exc:
        print(f"meta-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
