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
from meta_kernels import distributed
from meta_kernels.config import ALGORITHMS, MAMLConfig, MAMLPlusPlusConfig
from meta_kernels.meta.inner import AdaptResult, NonFiniteLossError, StepLog, _as_task_batch, adapt_tasks, per_task_loss
from meta_kernels.meta.mamlpp import LSLR_MAX, LSLR_MIN, msl_weights
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


def accuracy_summary(accuracy: Tensor, curve_accuracy: list[float]) -> dict:
    """The evaluation record: mean per-task accuracy with its 95% confidence interval, and the
    adaptation curve (accuracy after 0..K steps, averaged over tasks) with AUAC."""
    acc = accuracy.double()
    ci = 1.96 * float(acc.std(unbiased=True)) / math.sqrt(len(acc)) if len(acc) > 1 else math.nan
    return {"accuracy": float(acc.mean()), "ci95": ci, "episodes": len(acc), "curve_accuracy": curve_accuracy,
            "pre_adapt_acc": curve_accuracy[0], "post_adapt_acc": curve_accuracy[-1], "auac": auac(curve_accuracy)}


def _batch_parts(task_batch):
    if hasattr(task_batch, "x_support"):
        return task_batch.x_support, task_batch.y_support, task_batch.x_query, task_batch.y_query
    if len(task_batch) == 4:
        return tuple(task_batch)
    raise ValueError("task_batch must be a TaskBatch or (x_support, y_support, x_query, y_query)")


def reptile_epsilon(config: MAMLConfig, outer_steps: int) -> float:
    """Reptile's step size after `outer_steps` outer steps: linear decay to 0 over reptile_decay_steps."""
    if config.reptile_decay_steps <= 0:
        return config.reptile_epsilon
    return config.reptile_epsilon * max(0.0, 1.0 - outer_steps / config.reptile_decay_steps)


def resolve_algo(algo: str | None, config: MAMLConfig) -> str:
    algo = algo or config.algo
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGORITHMS)}")
    if algo != config.algo:
        raise ValueError(f"algo={algo!r} conflicts with config.algo={config.algo!r}; pass one of them, or "
                         f"config.replace(algo={algo!r})")
    return algo


def _adapt_for_meta(params, task_batch, *, algo, config, model, lrs, track_curve, msl_weights, bn_mode, first_order,
                    recompute=False):
    """Checks the task batch and adapts every task on its support set (MAML / FOMAML keep the
    inner graph; Reptile builds none). Returns (task_model, adapt result, x_query, y_query)."""
    xs, ys, xq, yq = _batch_parts(task_batch)
    xs, ys = _as_task_batch(xs, ys, "support", config.loss)
    xq, yq = _as_task_batch(xq, yq, "query", config.loss)
    if xs.shape[0] != xq.shape[0]:
        raise ValueError(f"support has {xs.shape[0]} tasks but query has {xq.shape[0]}; they must match")
    task_model = model if isinstance(model, TaskModel) else TaskModel(model)
    result: AdaptResult = adapt_tasks(
        params, (xs, ys), model=task_model, steps=config.inner_steps,
        lrs=config.inner_lr if lrs is None else lrs,
        first_order=config.first_order if first_order is None else first_order, inner_clip=config.inner_clip,
        engine=config.engine, backend=config.backend, no_graph=algo == "reptile",
        query_batch=(xq, yq) if (track_curve or msl_weights is not None) else None,
        on_nonfinite="skip" if config.skip_nonfinite_tasks else "raise", loss=config.loss, bn_mode=bn_mode,
        msl_weights=msl_weights if algo != "reptile" else None, recompute=recompute)
    return task_model, result, xq, yq


def _query_losses(task_model, adapted, xq, yq, ok, *, config, bn_mode, update_stats, first_task=0):
    """Per-task query loss and accuracy under the adapted weights, and `ok` without the tasks whose
    loss is not finite (raised about unless config.skip_nonfinite_tasks; skipped tasks are rerun
    with zeroed inputs so that no NaN enters the graph). first_task numbers the tasks in messages."""
    final = lambda x: task_model(adapted, x, step=config.inner_steps, bn_mode=bn_mode, update_stats=update_stats)
    with ops.use_backend(config.backend):
        loss_t, acc_t = per_task_loss(final(xq), yq, config.loss, "query")
        bad = ~torch.isfinite(loss_t.detach()) & ok
        if bool(bad.any()):
            tasks = (bad.nonzero().flatten() + first_task).tolist()
            if not config.skip_nonfinite_tasks:
                raise NonFiniteLossError(f"non-finite query loss after adaptation for task(s) {tasks}; check the query "
                                         "inputs, lower the inner lr, or set skip_nonfinite_tasks=True")
            ok = ok & ~bad
            xq = torch.where(bad.view(-1, *([1] * (xq.dim() - 1))), torch.zeros_like(xq), xq)
            loss_t, acc_t = per_task_loss(final(xq), yq, config.loss, "query")
    return loss_t, acc_t, ok


def _meta_metrics(result: AdaptResult, loss: Tensor | float, post: float, ok: Tensor) -> dict[str, float]:
    pre = result.curve_accuracy[0] if result.curve_accuracy else math.nan
    return {"pre_adapt_acc": pre, "post_adapt_acc": post, "fast_gain": post - pre,
            "auac": auac(result.curve_accuracy) if result.curve_accuracy else math.nan,
            "query_loss": float(loss), "skipped_tasks": int((~ok).sum())}


def meta_loss(params: dict[str, Tensor], task_batch, *, algo: str | None = None, config: MAMLConfig, model,
              lrs=None, track_curve: bool = True, msl_weights: Tensor | None = None, bn_mode: str = "transductive",
              first_order: bool | None = None, update_stats: bool = False) -> MetaOutput:
    """Meta-objective over the tasks of `task_batch`: mean query loss after adaptation.

    MAML: differentiable through the inner loop (second order). FOMAML: gradient at the adapted
    params (no second-order graph). Reptile: no graph at all -- the loss is for monitoring and
    logs.adapted_params feed `reptile_update_`. `lrs` overrides config.inner_lr (e.g. a learned
    per-step table). With track_curve the query set is also evaluated after every inner step
    (pre_adapt_acc, auac); without it those metrics are NaN.

    MAML++: msl_weights [steps] makes the loss the weighted query loss after every inner step;
    bn_mode selects transductive / per_step / frozen BatchNorm; first_order overrides the
    algorithm's order (derivative-order annealing); update_stats folds the final query pass's
    BN statistics into the model's running statistics (training passes only, never evaluation)."""
    algo = resolve_algo(algo, config)
    if config.recompute_inner:
        raise ValueError("config.recompute_inner rebuilds the inner graph during the backward, so meta_loss cannot "
                         "return a loss to call .backward() on: use meta_backward or MetaLearner.step, or set "
                         "recompute_inner=False")
    task_model, result, xq, yq = _adapt_for_meta(params, task_batch, algo=algo, config=config, model=model, lrs=lrs,
                                                 track_curve=track_curve, msl_weights=msl_weights, bn_mode=bn_mode,
                                                 first_order=first_order)
    loss_t, acc_t, ok = _query_losses(task_model, result.adapted, xq, yq, result.task_ok, config=config,
                                      bn_mode=bn_mode, update_stats=update_stats)
    if result.msl_loss_per_task is not None:
        loss_t = result.msl_loss_per_task
    weights = ok.to(loss_t.dtype) / ok.sum().clamp(min=1)
    loss = (torch.where(ok, loss_t, torch.zeros_like(loss_t)) * weights).sum()
    metrics = _meta_metrics(result, loss.detach(), float((acc_t * weights.to(acc_t.dtype)).sum()), ok)
    logs = MetaLogs(result.logs, result.adapted, result.curve_loss, result.curve_accuracy, metrics["skipped_tasks"])
    return MetaOutput(loss, metrics, logs)


def meta_backward(params: dict[str, Tensor], task_batch, *, algo: str | None = None, config: MAMLConfig, model,
                  lrs=None, track_curve: bool = False, first_order: bool | None = None,
                  scale: float = 1.0) -> dict[str, float]:
    """Back-propagates `scale * meta_loss(...).loss` (MAML / FOMAML, transductive BN, no MSL) and
    returns its metrics, with less memory: the query pass runs config.query_chunk tasks at a time,
    each chunk back-propagated to the adapted weights and its graph freed, before one backward
    through the inner loop -- with config.recompute_inner (MAML), one inner step's graph at a time,
    rebuilt from that step's starting weights. The same gradients as meta_loss(...).loss.backward()."""
    algo = resolve_algo(algo, config)
    if algo == "reptile":
        raise ValueError("meta_backward is for MAML and FOMAML; Reptile's update needs no meta-gradient")
    first_order = config.first_order if first_order is None else first_order
    recompute = config.recompute_inner and not first_order
    task_model, result, xq, yq = _adapt_for_meta(params, task_batch, algo=algo, config=config, model=model, lrs=lrs,
                                                 track_curve=track_curve, msl_weights=None, bn_mode="transductive",
                                                 first_order=first_order, recompute=recompute)
    # Recomputed, the adapted weights carry no graph: every weight that the base gives a gradient needs its own.
    names = [k for k, v in result.adapted.items() if (params[k].requires_grad if recompute else v.requires_grad)]
    T = xq.shape[0]
    chunk = config.query_chunk or T
    ok_parts, grad_parts, loss_sum, acc_sum = [], [], 0.0, 0.0
    for start in range(0, T, chunk):
        part = slice(start, start + chunk)
        # Leaves per chunk (not slices of one leaf, whose backward would fill a whole-batch buffer per chunk).
        leaves = {k: v[part].detach().requires_grad_(k in names) for k, v in result.adapted.items()}
        loss_t, acc_t, ok = _query_losses(task_model, leaves, xq[part], yq[part], result.task_ok[part], config=config,
                                          bn_mode="transductive", update_stats=False, first_task=start)
        kept = torch.where(ok, loss_t, torch.zeros_like(loss_t)).sum()
        if kept.requires_grad:
            kept.backward()  # d(sum of kept query losses) / d(adapted weights of this chunk)
        grad_parts.append([torch.zeros_like(leaves[k]) if leaves[k].grad is None else leaves[k].grad for k in names])
        ok_parts.append(ok)
        loss_sum += float(kept.detach())
        acc_sum += float(torch.where(ok, acc_t, torch.zeros_like(acc_t)).sum())
    ok = torch.cat(ok_parts)
    n_ok = max(int(ok.sum()), 1)
    adjoint = {k: torch.cat(parts).mul_(scale / n_ok) for k, parts in zip(names, zip(*grad_parts))}
    del grad_parts  # the meta-gradient's memory peak comes next
    if recompute:
        result.backward([adjoint[k] if k in adjoint else torch.zeros_like(v) for k, v in result.adapted.items()])
    elif names:
        torch.autograd.backward([result.adapted[k] for k in names], list(adjoint.values()))
    return _meta_metrics(result, loss_sum / n_ok, acc_sum / n_ok, ok)


class MetaLearner:
    """Outer loop of one model: MAML / FOMAML (meta-gradient + optimiser) or Reptile
    (theta += eps * (mean adapted - theta), eps decaying linearly), with the MAML++ options of
    `mamlpp` (learned per-step rates, multi-step loss, derivative-order annealing, BN modes).

    The meta-batch adapts together; `config.task_chunk` bounds memory by adapting that many tasks
    at a time and accumulating the meta-gradient."""

    def __init__(self, model: nn.Module, config: MAMLConfig, *, mamlpp: MAMLPlusPlusConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, task_batching: str = "auto",
                 compile: bool | str = False):
        self.model, self.config = model, config
        self.mamlpp = mamlpp or MAMLPlusPlusConfig(bn_mode="transductive")
        if compile and config.engine == "torch_func":
            raise ValueError("compile=True needs engine='custom' (torch.func transforms run the eager reference ops)")
        self.task_model = TaskModel(model, task_batching, compile=compile)
        names = [n for n, _ in model.named_parameters()]
        K = config.inner_steps
        self._check_bn_mode()
        if config.recompute_inner and (self.mamlpp.use_msl or self.mamlpp.bn_mode != "transductive"):
            raise ValueError("recompute_inner supports transductive BatchNorm without the multi-step loss; turn off "
                             "use_msl / use bn_mode='transductive', or set recompute_inner=False")
        device = next(model.parameters()).device
        # LSLR: one learned rate per parameter tensor and inner step, trained by the outer optimiser.
        self.lslr = (nn.Parameter(torch.full((K, len(names)), float(config.inner_lr), device=device))
                     if self.mamlpp.use_lslr else None)
        self.msl_logits = (nn.Parameter(torch.zeros(K, device=device))
                           if self.mamlpp.use_msl and self.mamlpp.msl_weights == "learned" else None)
        extra = [p for p in (self.lslr, self.msl_logits) if p is not None]
        outer = torch.optim.Adam if config.meta_optimizer == "adam" else torch.optim.SGD
        self.optimizer = optimizer or outer(list(model.parameters()) + extra, lr=config.meta_lr)
        if optimizer is not None and extra:
            self.optimizer.add_param_group({"params": extra})
        self.outer_steps = 0

    def _check_bn_mode(self) -> None:
        mode = self.mamlpp.bn_mode
        if mode == "transductive":
            return
        if self.task_model.mode != "native":
            raise ValueError(f"bn_mode {mode!r} needs a model with forward_tasks (meta_kernels.models.Conv4); "
                             f"{type(self.model).__name__} supports only 'transductive'")
        if mode == "per_step":
            bn = [p for n, p in self.model.named_parameters() if n.endswith("bn.weight")]
            need = self.config.inner_steps + 1
            if not bn or any(p.dim() != 2 or p.shape[0] < need for p in bn):
                raise ValueError(f"bn_mode 'per_step' needs BatchNorm affine rows for every inner step: build the "
                                 f"model with Conv4(..., bn_steps={need}) (inner_steps + 1)")

    # ---- MAML++ state ------------------------------------------------------------------------
    def inner_lrs(self):
        """The inner rates used now: the clamped LSLR table, or config.inner_lr."""
        if self.lslr is None:
            return self.config.inner_lr
        return self.lslr.clamp(LSLR_MIN, LSLR_MAX)

    def current_msl_weights(self, epoch: int) -> Tensor | None:
        p = self.mamlpp
        if not p.use_msl or self.config.algo == "reptile":
            return None
        return msl_weights(p.msl_weights, self.config.inner_steps, epoch, logits=self.msl_logits,
                           decay_epochs=p.msl_decay_epochs).to(next(self.model.parameters()).device)

    def first_order_at(self, epoch: int) -> bool:
        """Derivative-order annealing: first order before annealing_start_epoch, then the algorithm's."""
        if self.mamlpp.use_annealing and epoch < self.mamlpp.annealing_start_epoch:
            return True
        return self.config.first_order

    def state_dict(self) -> dict:
        return {"outer_steps": self.outer_steps, "optimizer": self.optimizer.state_dict(),
                "lslr": None if self.lslr is None else self.lslr.detach().clone(),
                "msl_logits": None if self.msl_logits is None else self.msl_logits.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("lslr", "msl_logits"):
            mine, saved = getattr(self, name), state.get(name)
            if (mine is None) != (saved is None) or (mine is not None and mine.shape != saved.shape):
                raise ValueError(f"checkpoint {name} {None if saved is None else list(saved.shape)} does not match this "
                                 f"learner's {None if mine is None else list(mine.shape)}: the MAML++ settings or the "
                                 "model differ")
            if mine is not None:
                with torch.no_grad():
                    mine.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.outer_steps = state["outer_steps"]

    def _reptile_adapt(self, params, sub, lrs):
        # Reptile trains each task on all of its examples (support and query alike are training
        # data of a meta-training task), as in Nichol et al. 2018; evaluation adapts on support only.
        xs, ys, xq, yq = _batch_parts(sub)
        if ys.dim() == yq.dim() and ys.dim() >= 2:
            xs, ys = torch.cat([xs, xq], 1), torch.cat([ys, yq], 1)
        cfg = self.config
        result = adapt_tasks(params, (xs, ys), model=self.task_model, steps=cfg.inner_steps, lrs=lrs, first_order=True,
                             inner_clip=cfg.inner_clip, engine=cfg.engine, backend=cfg.backend, no_graph=True,
                             on_nonfinite="skip" if cfg.skip_nonfinite_tasks else "raise", loss=cfg.loss,
                             bn_mode=self.mamlpp.bn_mode)
        last = result.logs[-1]
        nan = math.nan
        metrics = {"pre_adapt_acc": nan, "post_adapt_acc": nan, "fast_gain": nan, "auac": nan,
                   "query_loss": nan, "support_loss": last.loss, "skipped_tasks": int((~result.task_ok).sum())}
        return result.adapted, metrics

    def reptile_epsilon(self) -> float:
        return reptile_epsilon(self.config, self.outer_steps)

    # ---- the outer step ----------------------------------------------------------------------
    def step(self, task_batch, *, epoch: int = 0, track_curve: bool = False,
             total_tasks: int | None = None) -> dict[str, float]:
        """One outer step on a meta-batch; returns metrics averaged over its tasks.

        Under torch.distributed, `task_batch` is this rank's shard and `total_tasks` the size of
        the whole meta-batch: gradients (or Reptile's adapted weights) are summed over ranks, so
        every rank takes the step the unsharded meta-batch would give."""
        parts = _batch_parts(task_batch)
        single = self.config.loss == "cross_entropy" and parts[1].dim() == 1
        local = 1 if single else parts[0].shape[0]
        rank, world_size = distributed.world()
        T = total_tasks or local
        chunk = self.config.task_chunk or local
        params = dict(self.model.named_parameters())
        algo = self.config.algo
        totals: dict[str, float] = {}
        adapted_chunks = []
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, local, chunk):
            lrs, msl = self.inner_lrs(), self.current_msl_weights(epoch)  # per chunk: each graph is freed
            sub = parts if single else tuple(p[start:start + chunk] for p in parts)
            n = 1 if single else sub[1].shape[0]
            if algo == "reptile" and not track_curve:
                # Reptile's update needs only the adapted weights: no query pass on the hot path.
                adapted, metrics = self._reptile_adapt(params, sub, lrs)
                adapted_chunks.append(adapted)
            elif algo != "reptile" and msl is None and self.mamlpp.bn_mode == "transductive":
                # The query graph a chunk of tasks at a time (config.query_chunk), not all at once.
                metrics = meta_backward(params, sub, config=self.config, model=self.task_model, lrs=lrs,
                                        track_curve=track_curve, first_order=self.first_order_at(epoch), scale=n / T)
            else:
                out = meta_loss(params, sub, config=self.config, model=self.task_model, track_curve=track_curve,
                                lrs=lrs, msl_weights=msl, bn_mode=self.mamlpp.bn_mode,
                                first_order=self.first_order_at(epoch),
                                update_stats=self.mamlpp.bn_mode != "transductive")
                metrics = out.metrics
                if algo == "reptile":
                    adapted_chunks.append(out.logs.adapted_params)
                else:
                    (out.loss * (n / T)).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * (n if k != "skipped_tasks" else 1)
        if algo == "reptile":
            names = list(params)
            adapted = [torch.cat([c[k] for c in adapted_chunks]) for k in names]
            if world_size > 1:  # mean over all ranks' tasks, passed on as a single "task"
                sums = [a.sum(0) for a in adapted]
                distributed.all_reduce_sum_(sums)
                adapted = [(s_ / T).unsqueeze(0) for s_ in sums]
            with torch.no_grad():
                ops.reptile_update_(list(params.values()), adapted, self.reptile_epsilon(), backend=self.config.backend)
        else:
            if world_size > 1:
                trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
                for p in trainable:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                distributed.all_reduce_sum_([p.grad for p in trainable])
            self.optimizer.step()
            if self.lslr is not None:
                with torch.no_grad():  # learned rates never leave the clamp range
                    self.lslr.clamp_(LSLR_MIN, LSLR_MAX)
        self.outer_steps += 1
        if world_size > 1 and self.mamlpp.bn_mode != "transductive":
            # Running BN statistics were folded from this rank's tasks: the task-weighted sum over
            # ranks equals folding the statistics of the whole meta-batch.
            stats = [b for b in self.model.buffers() if b.is_floating_point()]
            with torch.no_grad():
                for b in stats:
                    b.mul_(local / T)
                distributed.all_reduce_sum_(stats)
        if world_size > 1:
            keys = sorted(totals)
            values = torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                                  device=next(self.model.parameters()).device)
            distributed.all_reduce_sum_([values])
            totals = dict(zip(keys, values.tolist()))
        return {k: (v / T if k != "skipped_tasks" else v) for k, v in totals.items()}
