"""First-order meta-learning of models too large for one GPU: parameters sharded with FSDP.

Ranks cannot hold different tasks here: a task's adapted weights are sharded like the base
weights, so all ranks adapt the same task together, each on its slice of the task's examples.
FSDP's gradient reduce-scatter then averages the slices into the task's full gradient, every
inner update (`sgd_step_`, clipped by the global norm) runs on the local shards, and the base
shards are restored before the next task. The meta-batch is therefore a loop over tasks, and
every rank samples the whole meta-batch (not the rank sharding of `MetaLearner`).

FOMAML: the meta-gradient is the mean over tasks of the query gradient at the adapted weights;
the query pass (forward and backward) may run under bf16 autocast, the inner loop always runs in
fp32. Reptile: theta += eps * (mean adapted - theta) through `reptile_update_` on the shards.

    learner = ShardedMetaLearner(ViT(...), MAMLConfig(algo="fomaml"), autocast="bf16")
    metrics = learner.step(task_batch)   # same task batch on every rank
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import meta_kernels.ops as ops
from meta_kernels import distributed
from meta_kernels.config import MAMLConfig
from meta_kernels.meta.algorithms import reptile_epsilon
from meta_kernels.meta.inner_common import NonFiniteLossError, as_task_batch, batch_parts
from meta_kernels.meta.learner import Learner, TaskScores
from meta_kernels.meta.task_model import _has_batch_norm
from meta_kernels.tensor_utils import to_compute

SHARDED_ALGOS = ("fomaml", "reptile")
AUTOCAST = ("none", "bf16")


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: one unit per block of `model.blocks` (if any), the rest in the root unit."""
    from torch.distributed.fsdp import fully_shard
    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


class ShardedMetaLearner(Learner):
    # Every rank adapts every task (on its slice of the examples), so evaluation and gathering the
    # weights are collectives, and each rank samples the whole meta-batch.
    collective = True

    def __init__(self, model: nn.Module, config: MAMLConfig, *, autocast: str = "none"):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sharded meta-learning runs in a process group: launch with torchrun (one process "
                               "per GPU, --nproc_per_node=1 for one), or use run.sharding='none'")
        if config.algo not in SHARDED_ALGOS:
            raise ValueError(f"sharded (FSDP) meta-learning supports {' and '.join(SHARDED_ALGOS)}, not "
                             f"{config.algo!r}: second-order MAML would need the full inner-loop graph of every "
                             "task; use algo='fomaml' or 'reptile'")
        if config.reptile_update != "interpolate":
            raise ValueError("sharded (FSDP) Reptile interpolates (reptile_update='interpolate'); use run.sharding="
                             "'none' for reptile_update='meta_optimizer'")
        if config.inner_optimizer != "sgd":
            raise ValueError(f"sharded (FSDP) meta-learning runs plain SGD inside, not inner_optimizer="
                             f"{config.inner_optimizer!r}; use run.sharding='none' for an inner optimizer with state")
        if autocast not in AUTOCAST:
            raise ValueError(f"unknown autocast {autocast!r}; choose one of {', '.join(AUTOCAST)}")
        if _has_batch_norm(model):
            raise ValueError(f"{type(model).__name__} has BatchNorm: with a task's examples split across ranks each "
                             "rank would normalise with its own slice's statistics; shard a model without BatchNorm "
                             "(e.g. meta_kernels.models.ViT)")
        self.config, self.autocast = config, autocast
        self.model = shard_model(model)
        self.params = list(self.model.parameters())
        outer = torch.optim.Adam if config.meta_optimizer == "adam" else torch.optim.SGD
        self.optimizer = outer(self.params, lr=config.meta_lr)
        self.outer_steps = 0
        self.device = self.params[0].device

    # ---- pieces of a task ------------------------------------------------------------------------
    def _local(self) -> list[Tensor]:
        return [p.to_local() for p in self.params]

    def _slice(self, x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor, int]:
        rank, world_size = distributed.world()
        if x.shape[0] < world_size:
            raise ValueError(f"a task's {name} set has {x.shape[0]} examples but there are {world_size} ranks: each "
                             "rank needs at least one; raise k_shot/q_query or use fewer ranks")
        return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank], x.shape[0]

    def _forward_loss(self, x: Tensor, y: Tensor, n_total: int) -> tuple[Tensor, Tensor]:
        """This rank's share of the task's mean loss, scaled for FSDP's average over ranks, and
        [loss sum, correct] of the slice for the metrics."""
        out = to_compute(self.model(x))
        loss_sum = F.cross_entropy(out, y, reduction="sum")
        stats = torch.stack([loss_sum.detach(), (out.detach().argmax(-1) == y).sum().to(loss_sum.dtype)])
        return loss_sum * (distributed.world()[1] / n_total), stats

    def _global(self, stats: Tensor, n_total: int) -> tuple[float, float]:
        dist.all_reduce(stats)
        return float(stats[0]) / n_total, float(stats[1]) / n_total

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _adapt(self, x: Tensor, y: Tensor, *, query=None, task: int = 0) -> tuple[float, list[tuple[float, float]]]:
        """K inner steps on this task, in place on the local shards, in fp32. Returns the last
        support loss and (with `query`) the query (loss, accuracy) after 0..K steps."""
        cfg = self.config
        xl, yl, n = self._slice(x, y, "support")
        curve, loss = [], math.nan
        with torch.autocast(self.device.type, enabled=False):
            for step in range(cfg.inner_steps + 1):
                if query is not None:
                    curve.append(self._query_scores(*query))
                if step == cfg.inner_steps:
                    break
                self._zero_grad()
                scaled, stats = self._forward_loss(xl, yl, n)
                scaled.backward()
                loss = self._global(stats, n)[0]
                if not math.isfinite(loss):
                    raise NonFiniteLossError(f"non-finite inner loss at step {step} for task {task}; lower the inner lr")
                self._sgd_on_shards()
        return loss, curve

    def _sgd_on_shards(self) -> None:
        """theta_shard -= lr * clip_factor * grad_shard; the clip factor from the norm over all ranks' shards."""
        pairs = [(p.to_local(), p.grad.to_local()) for p in self.params if p.grad is not None]
        pairs = [(w, g) for w, g in pairs if w.numel()]  # FSDP leaves some ranks empty shards of small tensors
        factor = 1.0
        if self.config.inner_clip is not None:
            local_norm = ops.clip_grad_norm([g.reshape(1, -1) for _, g in pairs], 1.0)[0] if pairs else None
            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            if local_norm is not None:
                sq += local_norm[0].double() ** 2
            dist.all_reduce(sq)
            factor = min(1.0, self.config.inner_clip / (float(sq.sqrt()) + 1e-6))
        if pairs:
            with torch.no_grad():
                ops.sgd_step_([w for w, _ in pairs], [g for _, g in pairs], self.config.inner_lr * factor,
                              backend=self.config.backend)

    def _query_scores(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(loss, accuracy) of the task's whole query set under the current weights."""
        xl, yl, n = self._slice(x, y, "query")
        with torch.no_grad():
            return self._global(self._forward_loss(xl, yl, n)[1], n)

    def _outer_autocast(self):
        if self.autocast == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- the outer step --------------------------------------------------------------------------
    def step(self, task_batch, *, epoch: int = 0, total_tasks: int | None = None) -> dict[str, float]:
        """One outer step on the whole meta-batch (the same on every rank)."""
        xs, ys, xq, yq = batch_parts(task_batch)
        xs, ys = as_task_batch(xs, ys, "support")
        xq, yq = as_task_batch(xq, yq, "query")
        T, reptile = xs.shape[0], self.config.algo == "reptile"
        local = self._local()
        base = [w.detach().clone() for w in local]
        total = [torch.zeros_like(w) for w in local]  # FOMAML: sum of query grads; Reptile: of adapted weights
        sums = {"support_loss": 0.0, "query_loss": 0.0, "post_adapt_acc": 0.0}
        for t in range(T):
            if reptile:  # Reptile trains on all of a task's examples (as MetaLearner)
                sums["support_loss"] += self._adapt(torch.cat([xs[t], xq[t]]), torch.cat([ys[t], yq[t]]), task=t)[0]
                with torch.no_grad():
                    torch._foreach_add_(total, local)
            else:
                sums["support_loss"] += self._adapt(xs[t], ys[t], task=t)[0]
                self._zero_grad()
                xl, yl, n = self._slice(xq[t], yq[t], "query")
                with self._outer_autocast():
                    scaled, stats = self._forward_loss(xl, yl, n)
                scaled.backward()
                loss, acc = self._global(stats, n)
                sums["query_loss"] += loss
                sums["post_adapt_acc"] += acc
                with torch.no_grad():
                    torch._foreach_add_(total, [p.grad.to_local() if p.grad is not None else torch.zeros_like(w)
                                                for p, w in zip(self.params, local)])
            with torch.no_grad():
                torch._foreach_copy_(local, base)
        if reptile:
            keep = [i for i, w in enumerate(local) if w.numel()]
            epsilon = reptile_epsilon(self.config, self.outer_steps)
            if epsilon > 0:  # decayed to 0: no update (the op takes epsilon in (0, 1])
                with torch.no_grad():
                    ops.reptile_update_([local[i] for i in keep], [(total[i] / T).unsqueeze(0) for i in keep],
                                        epsilon, backend=self.config.backend)
        else:
            for p, g in zip(self.params, total):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.to_local().copy_(g / T)
            self.optimizer.step()
            self._zero_grad()
        self.outer_steps += 1
        nan = math.nan
        metrics = {k: v / T for k, v in sums.items()}
        if reptile:
            metrics.update(query_loss=nan, post_adapt_acc=nan)
        return {"pre_adapt_acc": nan, "fast_gain": nan, "auac": nan, "skipped_tasks": 0, **metrics}

    def task_share(self) -> tuple[int, int]:
        return 0, 1  # the whole meta-batch on every rank

    def evaluate_tasks(self, task_batch) -> TaskScores:
        """Each task adapted on its support set as in training, scored on its query set after every
        inner step; the base weights are restored after each task."""
        xs, ys, xq, yq = batch_parts(task_batch)
        local = self._local()
        base = [w.detach().clone() for w in local]
        curves = []  # per task: (query loss, query accuracy) after 0..K steps
        for t in range(xs.shape[0]):
            curves.append(self._adapt(xs[t], ys[t], query=(xq[t], yq[t]), task=t)[1])
            with torch.no_grad():
                torch._foreach_copy_(local, base)
        self._zero_grad()
        scores = torch.tensor(curves, dtype=torch.float64)  # [T, K + 1, (loss, accuracy)]
        return TaskScores(curve_accuracy=scores[:, :, 1], query_loss=scores[:, -1, 0])

    # ---- checkpoints: full (unsharded) state, so a run resumes on any number of ranks -------------
    def model_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"outer_steps": self.outer_steps, "optimizer": optim}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.outer_steps = state["outer_steps"]

    # ---- sharded checkpoints (torch.distributed.checkpoint): each rank keeps its own shards -------
    def sharded_state_dict(self) -> dict:
        """{"model", "optimizer"}: this rank's shards as DTensors, nothing gathered (for DCP)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optim}

    def load_sharded_state_dict(self, state: dict, outer_steps: int) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.outer_steps = outer_steps
