"""Multi-process meta-training with torch.distributed, as launched by torchrun.

Each rank adapts its share of the meta-batch (EpisodeSampler's rank/world sharding) and the
meta-gradients are summed across ranks by one explicit all-reduce of a flat buffer after the
backward -- correct with the inner loop's second-order graph, which DDP's per-module hooks do
not see. Reptile all-reduces the sum of adapted weights instead. NCCL on GPUs, gloo on CPUs;
a timeout turns a dead peer into an error instead of a hang."""
from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher with the same contract) set the rendezvous environment;
    also with one process, so the sharded learner gets its process group."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: str = "cpu", timeout_s: float = 120.0) -> tuple[int, int]:
    """Joins the process group torchrun describes in the environment (no-op for one process)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return world()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    # Keys under a prefix per torchrun restart: after a restart, gloo would otherwise read the
    # peers' addresses that the failed attempt left in torchrun's store (connection refused).
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"meta_kernels/restart{restart}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    atexit.register(_destroy_at_exit)
    return world()


def _destroy_at_exit() -> None:
    # Left to the interpreter's teardown, gloo's threads were seen to abort a rank at exit
    # ("terminate called without an active exception") after a finished run. The barrier keeps
    # a rank from closing its connections while a peer still has an operation in flight to it;
    # its short timeout bounds the wait when this rank leaves on an error and its peers do not.
    if not dist.is_initialized():
        return
    try:
        if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=10))
    except Exception:  # a peer gone or elsewhere: nothing more to wait for
        pass
    dist.destroy_process_group()


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sums the tensors over all ranks in place, as one flat all-reduce."""
    if world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    if world()[1] == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def comm_bytes_per_step(n_params: int, world_size: int, bytes_per_value: int = 4) -> float:
    """Bytes each rank sends per outer step in a ring all-reduce of the meta-gradient."""
    return 2 * (world_size - 1) / world_size * n_params * bytes_per_value


def fsdp_comm_bytes_per_step(n_params: int, world_size: int, tasks: int, passes_per_task: int,
                             bytes_per_value: int = 4) -> float:
    """Bytes each rank sends per outer step of the sharded learner: every forward + backward pass
    (the inner steps, and FOMAML's query pass) all-gathers the weights twice (forward, backward)
    and reduce-scatters the gradients once, each moving (W - 1) / W of the parameters."""
    return 3 * tasks * passes_per_task * (world_size - 1) / world_size * n_params * bytes_per_value
