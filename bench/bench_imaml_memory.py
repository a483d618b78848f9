"""Memory of one outer step against the number of inner steps: MAML (its unrolled second-order
graph), MAML with recompute_inner (one inner step's graph at a time) and iMAML (no graph through
the inner loop; one support-loss graph for the conjugate gradient), each row in a fresh process.

Model: Conv4 (64 filters, transductive BN), Omniglot 28x28, 5-way 1-shot 15-query, meta-batch 8,
inner lr 0.1, no clipping; iMAML lambda 2, 5 CG steps. Measures: the peak of tensor memory
allocated during a step (the profiler's allocation records, peak_memory.py) and the RSS growth of
the first step; also s per step.

    python bench/bench_imaml_memory.py                     # steps 1 5 20 50, table + JSON + plot
    python bench/bench_imaml_memory.py --steps 1 5
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("maml", "maml-recompute", "imaml")


def child(variant: str, steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    import torch
    import meta_kernels as mk
    from peak_memory import peak_allocated_cpu
    torch.manual_seed(0)
    model = mk.Conv4.omniglot(5)
    config = mk.MAMLConfig(algo="imaml" if variant == "imaml" else "maml", inner_steps=steps, inner_lr=0.1,
                           inner_clip=None, recompute_inner=variant == "maml-recompute", imaml_lambda=2.0,
                           imaml_cg_steps=5)
    learner = mk.MetaLearner(model, config, debug_batching=False)
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(8, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(8, 1),
             torch.rand(8, 75, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(15).repeat(8, 1))
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024
    start = time.perf_counter()
    learner.step(batch)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    allocated = peak_allocated_cpu(lambda: learner.step(batch))
    return {"variant": variant, "steps": steps, "s_per_step": seconds, "rss_growth_gb": rss / 1e9,
            "peak_allocated_gb": allocated / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20, 50])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "imaml_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    rows = []
    print("| inner steps | variant | peak allocated, GB | RSS growth, GB | s / step |\n|---:|---|---:|---:|---:|")
    for steps in args.steps:
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(steps)], capture_output=True,
                                 text=True, cwd=HERE)
            if out.returncode != 0:
                print(f"| {steps} | {variant} | failed: {out.stderr.strip().splitlines()[-1][:80]} | | |", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {steps} | {variant} | {row['peak_allocated_gb']:.3f} | {row['rss_growth_gb']:.3f} | "
                  f"{row['s_per_step']:.2f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    sys.path.insert(0, str(HERE))
    from _common import plot_curves
    curves = {v: ([r["steps"] for r in rows if r["variant"] == v], [r["peak_allocated_gb"] for r in rows
                                                                     if r["variant"] == v]) for v in VARIANTS}
    plot_curves(curves, out.with_suffix(".png"), "inner steps", "peak tensor memory of a step, GB",
                "Memory against inner steps: MAML, recompute_inner, iMAML")
    return 0


if __name__ == "__main__":
    sys.exit(main())
