"""GPU-only measurements for bench/gpu_check.sh: kernel launches per sgd_step, achieved
bandwidth of sgd_step / reptile_update_ against a device-to-device copy at >= 64 MB, and batched
batch_norm against per-task F.batch_norm at T = 32. Prints a markdown table; exits non-zero
when a bar is missed."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import meta_kernels as mk
from _common import conv4_shapes, machine


def cuda_time(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def kernel_launches(fn) -> int:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> int:
    rows, failures = [], []
    dev = "cuda"
    for backend in ("cuda", "triton"):
        for T in (1, 8, 32):
            params = [torch.randn((T,) + s, device=dev) for s in conv4_shapes()]
            grads = [torch.randn_like(p) for p in params]
            lrs = torch.full((len(params),), 0.1, device=dev)
            scale = torch.rand(T, device=dev)
            n = kernel_launches(lambda: mk.sgd_step(params, grads, lrs, scale, backend=backend))
            rows.append((f"sgd_step launches, Conv4 set, T={T}", backend, str(n), "1 (cuda)"))
            if backend == "cuda" and n != 1:
                failures.append(f"sgd_step on cuda took {n} launches at T={T}")
    # Bandwidth at >= 64 MB of parameters: T=160 Conv4 copies ~ 72 MB per tensor list.
    T = 160
    params = [torch.randn((T,) + s, device=dev) for s in conv4_shapes()]
    grads = [torch.randn_like(p) for p in params]
    lrs = torch.full((len(params),), 0.1, device=dev)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    flat = torch.randn(nbytes // 4, device=dev)
    copy_t = cuda_time(lambda: flat.clone())
    copy_bw = 2 * nbytes / copy_t
    rows.append((f"device-to-device copy, {nbytes / 1e6:.0f} MB", "torch", f"{copy_bw / 1e9:.0f} GB/s", "reference"))
    theta = [torch.randn(s, device=dev) for s in conv4_shapes()]
    for backend in ("cuda", "triton"):
        t = cuda_time(lambda: mk.sgd_step_(params, grads, lrs, backend=backend))
        bw = 3 * nbytes / t  # read params and grads, write params
        rows.append((f"sgd_step_ {nbytes / 1e6:.0f} MB", backend, f"{bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy", ">= 80%"))
        if backend == "cuda" and bw < 0.8 * copy_bw:
            failures.append(f"sgd_step_ at {bw / copy_bw:.0%} of copy bandwidth")
        t = cuda_time(lambda: mk.reptile_update_(theta, params, 0.1, backend=backend))
        bw = (nbytes + 2 * nbytes / T) / t
        rows.append((f"reptile_update_ {nbytes / 1e6:.0f} MB", backend, f"{bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy", ">= 80%"))
        if backend == "cuda" and bw < 0.8 * copy_bw:
            failures.append(f"reptile_update_ at {bw / copy_bw:.0%} of copy bandwidth")
    # Batched batch norm, forward + backward, Conv4 support activations at T = 32.
    layers = []
    for hw in (28, 14, 7, 3):
        x = torch.randn(32, 5, 64, hw, hw, device=dev, requires_grad=True)
        w = torch.rand(32, 64, device=dev, requires_grad=True)
        b = torch.randn(32, 64, device=dev, requires_grad=True)
        layers.append((x, w, b, torch.randn_like(x)))

    def run(bn):
        for x, w, b, go in layers:
            torch.autograd.grad(bn(x, w, b), (x, w, b), go)

    loop = cuda_time(lambda: run(lambda x, w, b: torch.stack([F.batch_norm(x[t], None, None, w[t], b[t], True)
                                                              for t in range(32)])), iters=10)
    for backend in ("cuda", "triton"):
        ours = cuda_time(lambda: run(lambda x, w, b: mk.batch_norm(x, w, b, backend=backend)), iters=10)
        rows.append(("batch_norm fwd+bwd T=32 vs F.batch_norm loop", backend, f"{loop / ours:.2f}x", ">= 2x"))
        if backend == "cuda" and loop / ours < 2:
            failures.append(f"batch_norm only {loop / ours:.2f}x the per-task loop")
    info = machine()
    print(f"\n### GPU check: {info.get('gpu')} | torch {info['torch']} | triton {info.get('triton')} | "
          f"commit {info['commit']} | {info['date']}\n")
    print("| measurement | backend | result | bar |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for f in failures:
        print(f"BAR MISSED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
