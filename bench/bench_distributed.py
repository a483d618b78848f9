"""Scaling from 1 to 2 ranks on this machine (torchrun, gloo) and the communication per outer step.

    python bench/bench_distributed.py --steps 20

Two set-ups, each trained for --steps outer steps with 1 and with 2 ranks on the same meta-batch:
- replicated: Conv4 MAML, Omniglot 5-way 1-shot, meta-batch 8 -- each rank adapts half of the
  tasks, one all-reduce of the meta-gradient per step;
- fsdp: a small ViT (dim 128, depth 4), FOMAML, parameters sharded -- all ranks adapt each task
  together on half of its examples.
Reports median seconds per outer step (the first 3 steps are warm-up), the speed-up, and the
bytes each rank sends per step (computed: meta_kernels.distributed). Every run gets the machine's
cores divided among its ranks. Writes bench/results/distributed.json."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = {
    "replicated (Conv4 MAML)": ["maml.algo=maml", "maml.inner_steps=3", "maml.inner_lr=0.4", "model.filters=64",
                                "maml.engine=custom", "mamlpp.bn_mode=transductive"],
    "fsdp (ViT FOMAML)": ["maml.algo=fomaml", "maml.inner_steps=3", "maml.inner_lr=0.05", "model.arch=vit",
                          "model.dim=128", "model.depth=4", "model.heads=4", "model.patch_size=7",
                          "mamlpp.bn_mode=transductive", "run.sharding=fsdp"],
}
COMMON = ["episodes.n_way=5", "episodes.k_shot=1", "episodes.q_query=15", "maml.meta_batch_size=8",
          "run.val_every=100000", "checkpoint.every_steps=100000", "episodes.episodes_per_epoch=4000"]


def worker(out: str, steps: int, overrides: list[str]) -> None:
    """Runs under torchrun: trains `steps` outer steps, rank 0 writes each step's duration."""
    import torch
    from meta_kernels import distributed
    from meta_kernels.config import MetaLearningFullConfig
    from meta_kernels.train import Trainer
    torch.set_num_threads(max(1, os.cpu_count() // int(os.environ.get("WORLD_SIZE", "1"))))
    trainer = Trainer(MetaLearningFullConfig.minimal().with_overrides(COMMON + overrides), out, overwrite=True,
                      progress=False)
    step, times = trainer.learner.step, []

    def timed(*a, **k):
        distributed.barrier()
        start = time.perf_counter()
        result = step(*a, **k)
        distributed.barrier()
        times.append(time.perf_counter() - start)
        return result

    trainer.learner.step = timed
    trainer.fit(max_steps=steps)
    if trainer.rank == 0:
        n = sum(p.numel() for p in trainer.model.parameters())
        Path(out, "times.json").write_text(json.dumps({"times": times, "params": n}))


def launch(nproc: int, steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", out, "--steps", str(steps)] + sum((["--set", o] for o in overrides), [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(Path(out, "times.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.set)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine
    from meta_kernels.config import MetaLearningFullConfig
    from meta_kernels.distributed import comm_bytes_per_step, fsdp_comm_bytes_per_step
    rows = []
    for name, overrides in SETUPS.items():
        config = MetaLearningFullConfig.minimal().with_overrides(COMMON + overrides)
        result = {}
        for nproc in (1, 2):
            run = launch(nproc, args.steps, overrides)
            result[nproc] = statistics.median(run["times"][3:])
            params = run["params"]
        if config.run.sharding == "fsdp":
            passes = config.maml.inner_steps + (config.maml.algo == "fomaml")  # + the query pass
            sent = fsdp_comm_bytes_per_step(params, 2, config.maml.meta_batch_size, passes)
        else:
            sent = comm_bytes_per_step(params, 2)
        rows.append({"setup": name, "params": params, "s_per_step_1_rank": result[1], "s_per_step_2_ranks": result[2],
                     "speedup": result[1] / result[2], "bytes_sent_per_rank_per_step_2_ranks": sent})
        print(f"{name}: 1 rank {result[1]:.3f} s/step, 2 ranks {result[2]:.3f} s/step "
              f"({result[1] / result[2]:.2f}x), {sent / 1e6:.2f} MB sent per rank per step", flush=True)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "distributed.json").write_text(json.dumps({"machine": machine(), "steps": args.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
