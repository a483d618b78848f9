"""Peak memory of one outer step, each implementation in a fresh process (in one process the
allocator's cache makes every later implementation look free). Prints GB above the RSS held
before the step (CPU) or peak CUDA allocations (GPU).

    python bench/peak_memory.py --T 32 --steps 5"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(impl: str, algo: str, T: int, steps: int) -> None:
    sys.path.insert(0, str(HERE))
    import torch
    import bench_meta_step as b
    batch = b._batch(T)
    if impl.removeprefix("ours-") in b.MEMORY_VARIANTS:
        fn = b.ours(algo, steps, **b.MEMORY_VARIANTS[impl.removeprefix("ours-")])
    else:
        fn = {"ours": b.ours, "plain-loop": b.plain_loop, "higher": b.with_higher}[impl](algo, steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/status") as f:
            before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024
        fn(batch)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"impl": impl, "algo": algo, "T": T, "steps": steps, "peak_gb": peak / 1e9}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "ALGO"))
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.T, args.steps)
        return 0
    sys.path.insert(0, str(HERE))
    from bench_meta_step import MEMORY_VARIANTS
    print("| algorithm | implementation | peak GB above the pre-step RSS |\n|---|---|---:|")
    for algo in ("maml", "fomaml"):
        for impl in ("ours", *(f"ours-{name}" for name in MEMORY_VARIANTS), "plain-loop", "higher"):
            out = subprocess.run([sys.executable, __file__, "--T", str(args.T), "--steps", str(args.steps),
                                  "--child", impl, algo], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {algo} | {impl} | {row['peak_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
