"""Scripts written against learn2learn and higher, run unchanged on the original library, with the
import swapped to meta_kernels.compat, and in the batched form; all in the same run, alternating.

The two loops are shaped like the libraries' MAML Omniglot examples (learn2learn's
examples/vision/maml_omniglot.py: clone / adapt / backward per task, gradients averaged; higher's
examples/maml-omniglot.py: innerloop_ctx / diffopt.step per task). Model: Conv4 with BatchNorm
(the peers' nn.Sequential: Conv2d 3x3 -> BatchNorm2d(track_running_stats=False) -> ReLU ->
MaxPool2d(2), x4, Flatten, Linear); Omniglot shape 1x28x28, 5-way 1-shot 15-query, meta-batch 32,
5 inner steps (lr 0.4), MAML (second order), Adam 1e-3 outside.

Rows: l2l-original (learn2learn 0.2's own MAML from its sdist, see
meta_kernels.compat.original_learn2learn; skipped offline), l2l-compat (import swapped),
l2l-batched (the 3-line change: `loss = task_sum(loss)`, `learner = maml.clone(tasks=T)` in place
of the task loop and its clone, the whole batch to fast_adapt); higher-original, higher-compat,
higher-batched (`innerloop_ctx(..., tasks=T)` in place of the task loop, `task_sum` losses).

Time:   pytest bench/bench_compat.py --benchmark-json=bench/results/compat.json
        python bench/summarize.py bench/results/compat.json
Memory: python bench/bench_compat.py --memory   (each row in a fresh process: RSS growth of one
        step and the peak of tensor memory allocated during a second)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meta_kernels as mk
from meta_kernels.compat import higher as compat_higher
from meta_kernels.compat import learn2learn as compat_l2l
from meta_kernels.compat import original_learn2learn, task_sum
from meta_kernels.models import sequential_conv4
from _common import interleaved_medians, machine, step_memory

HERE = Path(__file__).resolve().parent
T, WAYS, SHOTS, QUERY, STEPS, INNER_LR, META_LR = 32, 5, 1, 15, 5, 0.4, 1e-3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    mk.keep_freed_cpu_memory()  # as the trainer does on CPUs


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.rand(T, WAYS * SHOTS, 1, 28, 28, generator=g), torch.rand(T, WAYS * QUERY, 1, 28, 28, generator=g)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(T, 1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).repeat(T, 1)
    return tuple(t.to(DEVICE) for t in (xs, ys, xq, yq))


def fast_adapt(learner, loss, xs, ys, xq, yq):
    for _ in range(STEPS):
        learner.adapt(loss(learner(xs), ys))
    return loss(learner(xq), yq)


def l2l_loop(l2l, batched=False):
    """learn2learn's example loop; `batched` is the same script with its 3 lines changed."""
    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(sequential_conv4(WAYS).to(DEVICE), lr=INNER_LR)
    opt = torch.optim.Adam(maml.parameters(), META_LR)
    loss = nn.CrossEntropyLoss()
    if batched:
        loss = task_sum(loss)                                              # changed line 1

    def step(b):
        xs, ys, xq, yq = b
        opt.zero_grad()
        if batched:
            learner = maml.clone(tasks=T)                                  # changed line 2 (was the loop + clone)
            fast_adapt(learner, loss, xs, ys, xq, yq).backward()          # changed line 3 (the whole batch)
        else:
            for t in range(T):
                learner = maml.clone()
                fast_adapt(learner, loss, xs[t], ys[t], xq[t], yq[t]).backward()
        for p in maml.parameters():
            p.grad.mul_(1.0 / T)
        opt.step()
    return step


def higher_loop(higher, batched=False):
    """higher's example loop; `batched` passes tasks=T instead of looping and sums the task losses."""
    torch.manual_seed(0)
    net = sequential_conv4(WAYS).to(DEVICE)
    meta_opt, inner_opt = torch.optim.Adam(net.parameters(), META_LR), torch.optim.SGD(net.parameters(), INNER_LR)
    loss = task_sum(F.cross_entropy) if batched else F.cross_entropy

    def step(b):
        xs, ys, xq, yq = b
        meta_opt.zero_grad()
        for i in ([slice(None)] if batched else range(T)):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False,
                                      **({"tasks": T} if batched else {})) as (fnet, diffopt):
                for _ in range(STEPS):
                    diffopt.step(loss(fnet(xs[i]), ys[i]))
                loss(fnet(xq[i]), yq[i]).backward()
        meta_opt.step()
    return step


def implementations() -> dict:
    impls = {}
    try:
        original = original_learn2learn.load()
        impls["l2l-original"] = lambda: l2l_loop(original)
    except original_learn2learn.Unavailable as e:
        print(f"bench_compat: learn2learn 0.2 unavailable ({e}); its row is left out", file=sys.stderr)
    impls["l2l-compat"] = lambda: l2l_loop(compat_l2l)
    impls["l2l-batched"] = lambda: l2l_loop(compat_l2l, batched=True)
    try:
        import higher
        impls["higher-original"] = lambda: higher_loop(higher)
    except ImportError:
        print("bench_compat: higher is not installed; its row is left out", file=sys.stderr)
    impls["higher-compat"] = lambda: higher_loop(compat_higher)
    impls["higher-batched"] = lambda: higher_loop(compat_higher, batched=True)
    return impls


def test_compat_outer_step(benchmark):
    benchmark.group = "compat maml"
    b = batch()
    steps = {name: make() for name, make in implementations().items()}
    medians = interleaved_medians({k: (lambda fn=fn: fn(b)) for k, fn in steps.items()}, rounds=3, inner=1, warmup=1)
    ratios = {}
    for shape in ("l2l", "higher"):
        base = medians.get(f"{shape}-original")
        if base is not None:
            ratios.update({k: base / v for k, v in medians.items() if k.startswith(shape) and k != f"{shape}-original"})
    if "higher-original" in medians:
        ratios.update({f"{k} vs higher-original": medians["higher-original"] / v for k, v in medians.items()
                       if k.startswith("l2l")})
    benchmark.extra_info.update({"machine": machine(), "median_s": medians, "speedup_vs_original": ratios})
    print(json.dumps({"median_s": medians, "speedup_vs_original": ratios}, indent=1))
    benchmark.pedantic(lambda: steps["l2l-batched"](b), rounds=1, iterations=1)


def _child(impl: str) -> None:
    b = batch()
    fn = implementations()[impl]()
    print(json.dumps(step_memory(lambda: fn(b))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return 0
    print("| implementation | RSS growth, GB | peak allocated, GB |\n|---|---:|---:|")
    for impl in implementations():
        out = subprocess.run([sys.executable, __file__, "--child", impl], capture_output=True, text=True, check=True,
                             cwd=HERE)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {impl} | {row['rss_gb']:.3f} | {row['allocated_gb']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
