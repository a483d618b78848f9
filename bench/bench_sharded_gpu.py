"""Sharded (FSDP) FOMAML of the production_1b ViT on one GPU: seconds per outer step, tasks/s,
peak memory against the memory model, and the communication time estimated for 8 GPUs.

    torchrun --standalone --nproc_per_node=1 bench/bench_sharded_gpu.py --steps 4

Synthetic 84x84 tasks of the preset's shape (throughput does not depend on the pixels). Part of
bench/gpu_check.sh; prints one markdown table."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

NVLINK_BUS_GBPS = 360.0  # NCCL bus bandwidth typically reached on 8 x H100 SXM (NVLink 4), GB/s


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="production_1b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="config overrides (e.g. a smaller model)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    args = parser.parse_args()
    dev = args.device
    cuda = dev == "cuda"
    from meta_kernels import distributed
    from meta_kernels.config import MetaLearningFullConfig
    from meta_kernels.distributed import fsdp_comm_bytes_per_step
    from meta_kernels.fsdp_memory import sharded_memory_per_gpu
    from meta_kernels.meta import ShardedMetaLearner
    from meta_kernels.train import build_model
    config = MetaLearningFullConfig.preset(args.preset).with_overrides(args.set + [f"run.device={dev}"])
    distributed.init_from_env(dev, 600)
    torch.manual_seed(0)
    model = build_model(config, (3, 84, 84)).to(dev)
    learner = ShardedMetaLearner(model, config.maml, autocast=config.run.autocast)
    ep, T = config.episodes, config.maml.meta_batch_size
    g = torch.Generator(device=dev).manual_seed(0)
    labels = lambda per_class: torch.arange(ep.n_way, device=dev).repeat_interleave(per_class).expand(T, -1).contiguous()
    batch = (torch.randn(T, ep.n_way * ep.k_shot, 3, 84, 84, device=dev, generator=g), labels(ep.k_shot),
             torch.randn(T, ep.n_way * ep.q_query, 3, 84, 84, device=dev, generator=g), labels(ep.q_query))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        learner.step(batch)
        sync()
        times.append(time.perf_counter() - start)
    s = statistics.median(times[1:] or times)
    predicted = sharded_memory_per_gpu(config, 1)
    n = int(predicted["parameters"])
    passes = config.maml.inner_steps + 1
    comm8 = fsdp_comm_bytes_per_step(n, 8, T, passes)
    card = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n### {args.preset} sharded FOMAML, 1 device: {card} | torch {torch.__version__} | {' '.join(args.set)}")
    print("| measurement | value |\n|---|---|")
    print(f"| parameters | {n / 1e9:.2f} B |")
    print(f"| s per outer step (meta-batch {T}, {config.maml.inner_steps} inner steps) | {s:.3f} |")
    print(f"| tasks/s | {T / s:.1f} |")
    measured = f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if cuda else "n/a"
    print(f"| peak memory measured / memory model | {measured} / {predicted['peak'] / 1e9:.1f} GB |")
    print(f"| 8 GPUs: bytes sent per rank per step (FSDP) | {comm8 / 1e9:.1f} GB |")
    print(f"| 8 GPUs: estimated communication time per step at {NVLINK_BUS_GBPS:.0f} GB/s bus bandwidth | "
          f"{comm8 / (NVLINK_BUS_GBPS * 1e9):.3f} s (vs {s / 8:.3f} s of compute per rank if it divides by 8) |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
