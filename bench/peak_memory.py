"""Peak memory of one outer step, each implementation in a fresh process (in one process the
allocator's cache makes every later implementation look free). GPU: peak CUDA allocations.
CPU, two measures: the RSS growth of the first step above what the process held before it
(what the system sees, allocator caches and fragmentation included), and the peak of tensor
memory allocated during a second step (the CPU analogue of torch.cuda.max_memory_allocated,
from the profiler's allocation records: no allocator effects, little noise).

    python bench/peak_memory.py --T 32 --steps 5"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
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
    allocated = None
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
        allocated = peak_allocated_cpu(lambda: fn(batch))
    print(json.dumps({"impl": impl, "algo": algo, "T": T, "steps": steps, "peak_gb": peak / 1e9,
                      "allocated_gb": None if allocated is None else allocated / 1e9}))


def peak_allocated_cpu(fn) -> int:
    """Peak bytes of CPU tensor memory allocated while fn runs, above what was allocated before."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(totals, default=0)


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
    from bench_meta_step import memory_variants
    print("| algorithm | implementation | RSS growth, GB | peak allocated, GB |\n|---|---|---:|---:|")
    for algo in ("maml", "fomaml"):
        for impl in ("ours", *(f"ours-{name}" for name in memory_variants(algo)), "plain-loop", "higher"):
            out = subprocess.run([sys.executable, __file__, "--T", str(args.T), "--steps", str(args.steps),
                                  "--child", impl, algo], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            alloc = "-" if row["allocated_gb"] is None else f"{row['allocated_gb']:.3f}"
            print(f"| {algo} | {impl} | {row['peak_gb']:.3f} | {alloc} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
