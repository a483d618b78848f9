"""MAML, FOMAML and Reptile on top of the inner loop.

    loss, metrics, logs = meta_loss(params, task_batch, algo="maml", config=cfg, model=model)
    loss.backward()   # MAML/FOMAML meta-gradient on params

`MetaLearner` runs whole outer steps (optimiser, task chunks, Reptile's update)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

import meta_kernels.ops as ops
from meta_kernels.config import ALGORITHMS, MAMLConfig
from meta_kernels.meta.inner import AdaptResult, NonFiniteLossError, StepLog, _as_task_batch, adapt_tasks, per_task_loss
from meta_kernels.meta.task_model import TaskModel


@dataclass
class MetaLogs:
    inner: list[StepLog]
    adapted_params: dict[str, Tensor]
    curve_loss: list[float]      # query loss after 0..K inner steps (empty when not tracked)
    curve_accuracy: list[float]  # query accuracy after 0..K inner steps
    skipped_tasks: int


class MetaOutput(NamedTuple):
    loss: Tensor
    metrics: dict[str, float]
    logs: MetaLogs


def auac(curve_accuracy: list[float]) -> float:
    """Area under the accuracy-vs-step curve (trapezoid), normalised to [0, 1] by the number of steps."""
    if len(curve_accuracy) < 2:
        return curve_accuracy[0] if curve_accuracy else math.nan
    area = sum((a + b) / 2 for a, b in zip(curve_accuracy[:-1], curve_accuracy[1:]))
    return area / (len(curve_accuracy) - 1)


def _batch_parts(task_batch):
    if hasattr(task_batch, "x_support"):
        return task_batch.x_support, task_batch.y_support, task_batch.x_query, task_batch.y_query
    if len(task_batch) == 4:
        return tuple(task_batch)
    raise ValueError("task_batch must be a TaskBatch or (x_support, y_support, x_query, y_query)")


def resolve_algo(algo: str | None, config: MAMLConfig) -> str:
    algo = algo or config.algo
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGORITHMS)}")
    if algo != config.algo:
        raise ValueError(f"algo={algo!r} conflicts with config.algo={config.algo!r}; pass one of them, or "
                         f"config.replace(algo={algo!r})")
    return algo


def meta_loss(params: dict[str, Tensor], task_batch, *, algo: str | None = None, config: MAMLConfig, model,
              lrs=None, track_curve: bool = True) -> MetaOutput:
    """Meta-objective over the tasks of `task_batch`: mean query loss after adaptation.

    MAML: differentiable through the inner loop (second order). FOMAML: gradient at the adapted
    params (no second-order graph). Reptile: no graph at all -- the loss is for monitoring and
    logs.adapted_params feed `reptile_update_`. `lrs` overrides config.inner_lr (e.g. a learned
    per-step table). With track_curve the query set is also evaluated after every inner step
    (pre_adapt_acc, auac); without it those metrics are NaN."""
    algo = resolve_algo(algo, config)
    xs, ys, xq, yq = _batch_parts(task_batch)
    xs, ys = _as_task_batch(xs, ys, "support", config.loss)
    xq, yq = _as_task_batch(xq, yq, "query", config.loss)
    if xs.shape[0] != xq.shape[0]:
        raise ValueError(f"support has {xs.shape[0]} tasks but query has {xq.shape[0]}; they must match")
    task_model = model if isinstance(model, TaskModel) else TaskModel(model)
    result: AdaptResult = adapt_tasks(
        params, (xs, ys), model=task_model, steps=config.inner_steps,
        lrs=config.inner_lr if lrs is None else lrs, first_order=config.first_order, inner_clip=config.inner_clip,
        engine=config.engine, backend=config.backend, no_graph=algo == "reptile",
        query_batch=(xq, yq) if track_curve else None,
        on_nonfinite="skip" if config.skip_nonfinite_tasks else "raise", loss=config.loss)
    ok = result.task_ok
    with ops.use_backend(config.backend):
        loss_t, acc_t = per_task_loss(task_model(result.adapted, xq), yq, config.loss, "query")
        bad = ~torch.isfinite(loss_t.detach()) & ok
        if bool(bad.any()):
            tasks = bad.nonzero().flatten().tolist()
            if not config.skip_nonfinite_tasks:
                raise NonFiniteLossError(f"non-finite query loss after adaptation for task(s) {tasks}; check the query "
                                         "inputs, lower the inner lr, or set skip_nonfinite_tasks=True")
            ok = ok & ~bad  # recompute without those tasks' inputs so no NaN enters the graph
            xq = torch.where(bad.view(-1, *([1] * (xq.dim() - 1))), torch.zeros_like(xq), xq)
            loss_t, acc_t = per_task_loss(task_model(result.adapted, xq), yq, config.loss, "query")
    weights = ok.to(loss_t.dtype) / ok.sum().clamp(min=1)
    loss = (torch.where(ok, loss_t, torch.zeros_like(loss_t)) * weights).sum()
    post = float((acc_t * weights.to(acc_t.dtype)).sum())
    pre = result.curve_accuracy[0] if result.curve_accuracy else math.nan
    metrics = {"pre_adapt_acc": pre, "post_adapt_acc": post, "fast_gain": post - pre,
               "auac": auac(result.curve_accuracy) if result.curve_accuracy else math.nan,
               "query_loss": float(loss.detach()), "skipped_tasks": int((~ok).sum())}
    logs = MetaLogs(result.logs, result.adapted, result.curve_loss, result.curve_accuracy, metrics["skipped_tasks"])
    return MetaOutput(loss, metrics, logs)


class MetaLearner:
    """Outer loop of one model: MAML / FOMAML (meta-gradient + optimiser) or Reptile
    (theta += eps * (mean adapted - theta), eps decaying linearly).

    The meta-batch adapts together; `config.task_chunk` bounds memory by adapting that many tasks
    at a time and accumulating the meta-gradient."""

    def __init__(self, model: nn.Module, config: MAMLConfig, *, optimizer: torch.optim.Optimizer | None = None,
                 task_batching: str = "auto", compile: bool | str = False):
        self.model, self.config = model, config
        if compile and config.engine == "torch_func":
            raise ValueError("compile=True needs engine='custom' (torch.func transforms run the eager reference ops)")
        self.task_model = TaskModel(model, task_batching, compile=compile)
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=config.meta_lr)
        self.outer_steps = 0

    def reptile_epsilon(self) -> float:
        cfg = self.config
        if cfg.reptile_decay_steps <= 0:
            return cfg.reptile_epsilon
        return cfg.reptile_epsilon * max(0.0, 1.0 - self.outer_steps / cfg.reptile_decay_steps)

    def step(self, task_batch, *, track_curve: bool = False) -> dict[str, float]:
        """One outer step on a meta-batch; returns metrics averaged over its tasks."""
        parts = _batch_parts(task_batch)
        single = self.config.loss == "cross_entropy" and parts[1].dim() == 1
        T = 1 if single else parts[0].shape[0]
        chunk = self.config.task_chunk or T
        params = dict(self.model.named_parameters())
        algo = self.config.algo
        totals: dict[str, float] = {}
        adapted_chunks = []
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, T, chunk):
            sub = parts if single else tuple(p[start:start + chunk] for p in parts)
            out = meta_loss(params, sub, config=self.config, model=self.task_model, track_curve=track_curve)
            n = 1 if single else sub[1].shape[0]
            if algo == "reptile":
                adapted_chunks.append(out.logs.adapted_params)
            else:
                (out.loss * (n / T)).backward()
            for k, v in out.metrics.items():
                totals[k] = totals.get(k, 0.0) + v * (n if k != "skipped_tasks" else 1)
        if algo == "reptile":
            names = list(params)
            adapted = [torch.cat([c[k] for c in adapted_chunks]) for k in names]
            with torch.no_grad():
                ops.reptile_update_(list(params.values()), adapted, self.reptile_epsilon(), backend=self.config.backend)
        else:
            self.optimizer.step()
        self.outer_steps += 1
        return {k: (v / T if k != "skipped_tasks" else v) for k, v in totals.items()}
