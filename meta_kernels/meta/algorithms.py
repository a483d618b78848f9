"""MAML, FOMAML and Reptile on top of the inner loop.

    loss, metrics, logs = meta_loss(params, task_batch, algo="maml", config=cfg, model=model)
    loss.backward()   # MAML/FOMAML meta-gradient on params

`MetaLearner` runs whole outer steps (optimiser, task chunks, Reptile's update)."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

import meta_kernels.ops as ops
from meta_kernels import distributed
from meta_kernels.config import ALGORITHMS, MAMLConfig, MAMLPlusPlusConfig, bn_mode_error
from meta_kernels.meta.inner import adapt_tasks
from meta_kernels.meta.inner_common import (AdaptResult, CarriedState, InnerLoopSettings, NonFiniteLossError, StepLog, as_task_batch,
                                            check_devices, check_tensors, checked_flag,
                                            check_same_samples, compute_inputs,
                                            batch_parts, lead_tensor, map_inputs, query_pass)
from meta_kernels.meta.batching import check_task_independence
from meta_kernels.meta.imaml import implicit_meta_gradient
from meta_kernels.meta.learner import Learner, TaskScores, auac
from meta_kernels.meta.mamlpp import LSLR_MAX, LSLR_MIN, msl_weights
from meta_kernels.meta.task_model import TaskModel, as_task_model
from meta_kernels.tensor_utils import compute_dtype, task_view, to_compute


@dataclass
class MetaLogs:
    inner: list[StepLog]
    adapted_params: dict[str, Tensor]
    curve_loss: list[float]      # query loss after 0..K inner steps (empty when not tracked)
    curve_accuracy: list[float]  # query accuracy after 0..K inner steps
    skipped_tasks: int
    task_ok: Tensor | None = None  # [T] False for the tasks skipped as non-finite


class MetaOutput(NamedTuple):
    loss: Tensor
    metrics: dict[str, float]
    logs: MetaLogs


def reptile_epsilon(config: MAMLConfig, outer_steps: int) -> float:
    """Reptile's step size after `outer_steps` outer steps: linear decay to 0 over reptile_decay_steps."""
    if config.reptile_decay_steps <= 0:
        return config.reptile_epsilon
    return config.reptile_epsilon * max(0.0, 1.0 - outer_steps / config.reptile_decay_steps)


def checked_config(config, who: str) -> MAMLConfig:
    """`config` when it is a MAMLConfig; otherwise an error saying what to pass. A config
    changed after construction (cfg.algo = ...) is validated again, as a new one would be."""
    if isinstance(config, MAMLConfig):
        dataclasses.replace(config)  # runs the checks of MAMLConfig.__post_init__ on the current values
        return config
    hint = " (a dict of fields: MAMLConfig(**fields))" if isinstance(config, dict) else ""
    raise TypeError(f"{who}: config must be a MAMLConfig, e.g. meta_kernels.MAMLConfig(algo='maml', inner_steps=5, "
                    f"inner_lr=0.4){hint}; got {type(config).__name__}")


def _check_compile(compile) -> None:
    if isinstance(compile, bool):
        return
    if isinstance(compile, str):
        backends = torch._dynamo.list_backends()
        if compile in backends:
            return
        raise ValueError(f"compile={compile!r} is not a torch.compile backend; use True (inductor), False, or one of "
                         f"{', '.join(backends)}")
    raise TypeError(f"compile must be True, False or a torch.compile backend name, got {type(compile).__name__}")


def _check_optimizer(optimizer, model: nn.Module) -> None:
    """An optimiser given to MetaLearner must hold the model's trainable parameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"MetaLearner: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if id(p) not in held]
    if len(missing) == len(trainable):
        raise ValueError(f"MetaLearner: the optimizer holds none of {type(model).__name__}'s parameters, so the "
                         "meta-update would train nothing; build it from model.parameters()")
    if missing:
        warnings.warn(f"MetaLearner: the optimizer leaves out {len(missing)} trainable parameter(s) of the model "
                      f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): they get meta-gradients but no "
                      "update; freeze them (requires_grad_(False)) or add them to the optimizer", stacklevel=3)


def resolve_algo(algo: str | None, config: MAMLConfig, who: str = "meta_loss") -> str:
    config = checked_config(config, who)
    algo = algo or config.algo
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGORITHMS)}")
    if algo != config.algo:
        raise ValueError(f"algo={algo!r} conflicts with config.algo={config.algo!r}; pass one of them, or "
                         f"config.replace(algo={algo!r})")
    return algo


def meta_loss(params: dict[str, Tensor], task_batch, *, algo: str | None = None, config: MAMLConfig, model,
              lrs=None, track_curve: bool = True, msl_weights: Tensor | None = None, bn_mode: str = "transductive",
              first_order: bool | None = None, update_stats: bool = False, loss_fn=None,
              adapt_params=None) -> MetaOutput:
    """Meta-objective over the tasks of `task_batch`: mean query loss after adaptation.

    MAML: differentiable through the inner loop (second order). FOMAML: gradient at the adapted
    params (no second-order graph). Reptile: no graph at all -- the loss is for monitoring and
    logs.adapted_params feed `reptile_update_`. `lrs` overrides config.inner_lr (e.g. a learned
    per-step table). With track_curve the query set is also evaluated after every inner step
    (pre_adapt_acc, auac); without it those metrics are NaN.

    MAML++: msl_weights [steps] makes the loss the weighted query loss after every inner step;
    bn_mode selects transductive / per_step / frozen BatchNorm; first_order overrides the
    algorithm's order (derivative-order annealing); update_stats folds the final query pass's
    BN statistics into the model's running statistics (training passes only, never evaluation).

    loss_fn(outputs, targets) -> scalar replaces config.loss (any callable, applied per task);
    adapt_params (names or a predicate(name, tensor)) selects the adapted parameters (ANIL / BOIL),
    see InnerLoopSettings."""
    algo = resolve_algo(algo, config)
    if algo == "imaml":
        raise ValueError("iMAML's meta-gradient is a linear solve, not the gradient of a loss: use meta_backward or "
                         "MetaLearner.step")
    if config.recompute_inner:
        raise ValueError("config.recompute_inner rebuilds the inner graph during the backward, so meta_loss cannot "
                         "return a loss to call .backward() on: use meta_backward or MetaLearner.step, or set "
                         "recompute_inner=False")
    settings = InnerLoopSettings.from_config(config, bn_mode=bn_mode, no_graph=algo == "reptile",
                                             first_order=config.first_order if first_order is None else first_order,
                                             loss=loss_fn or config.loss, adapt_params=adapt_params)
    return _meta_loss(params, task_batch, settings, as_task_model(model), lrs=config.inner_lr if lrs is None else lrs,
                      track_curve=track_curve, msl_weights=msl_weights if algo != "reptile" else None,
                      update_stats=update_stats)


def meta_backward(params: dict[str, Tensor], task_batch, *, algo: str | None = None, config: MAMLConfig, model,
                  lrs=None, track_curve: bool = False, first_order: bool | None = None,
                  scale: float = 1.0, loss_fn=None, adapt_params=None) -> dict[str, float]:
    """Back-propagates `scale * meta_loss(...).loss` (MAML / FOMAML, transductive BN, no MSL) and
    returns its metrics, with less memory: the query pass runs config.query_chunk tasks at a time,
    each chunk back-propagated to the adapted weights and its graph freed, before one backward
    through the inner loop -- with config.recompute_inner (MAML), one inner step's graph at a time,
    rebuilt from that step's starting weights. The same gradients as meta_loss(...).loss.backward().
    iMAML: accumulates `scale` times the mean over tasks of the implicit meta-gradient (imaml.py)."""
    algo = resolve_algo(algo, config, "meta_backward")
    if algo == "reptile":
        raise ValueError("meta_backward is for MAML and FOMAML; Reptile's update needs no meta-gradient")
    first_order = config.first_order if first_order is None else first_order
    settings = InnerLoopSettings.from_config(config, first_order=first_order,
                                             recompute=config.recompute_inner and not first_order,
                                             loss=loss_fn or config.loss, adapt_params=adapt_params)
    if algo == "imaml":
        return _imaml_backward(params, task_batch, settings, as_task_model(model),
                               lrs=config.inner_lr if lrs is None else lrs, config=config, track_curve=track_curve,
                               scale=scale)
    return _meta_backward(params, task_batch, settings, as_task_model(model), lrs=config.inner_lr if lrs is None else lrs,
                          track_curve=track_curve, query_chunk=config.query_chunk, scale=scale)


def _meta_loss(params, task_batch, settings: InnerLoopSettings, task_model: TaskModel, *, lrs, track_curve: bool,
               msl_weights: Tensor | None, update_stats: bool) -> MetaOutput:
    """meta_loss with the inner loop's settings given."""
    result, xq, yq = _adapt_for_meta(params, task_batch, settings, task_model, lrs=lrs,
                                     with_query=track_curve or msl_weights is not None, msl_weights=msl_weights)
    loss_t, acc_t, ok = _query_losses(task_model, result.adapted, xq, yq, result.task_ok, settings,
                                      update_stats=update_stats)
    if result.msl_loss_per_task is not None:
        loss_t = result.msl_loss_per_task
    weights = ok.to(loss_t.dtype) / ok.sum().clamp(min=1)
    loss = (torch.where(ok, loss_t, torch.zeros_like(loss_t)) * weights).sum()
    metrics = _meta_metrics(result, loss.detach(), float((acc_t * weights.to(acc_t.dtype)).sum()), ok)
    logs = MetaLogs(result.logs, result.adapted, result.curve_loss, result.curve_accuracy, metrics["skipped_tasks"],
                    result.task_ok)
    return MetaOutput(loss, metrics, logs)


def _meta_backward(params, task_batch, settings: InnerLoopSettings, task_model: TaskModel, *, lrs, track_curve: bool,
                   query_chunk: int, scale: float, log_inner_steps: bool = False) -> dict[str, float]:
    """meta_backward with the inner loop's settings given."""
    recompute = settings.recompute
    result, xq, yq = _adapt_for_meta(params, task_batch, settings, task_model, lrs=lrs, with_query=track_curve,
                                     msl_weights=None)
    # Recomputed, the adapted weights carry no graph: every weight that the base gives a gradient needs its own.
    names = [k for k, v in result.adapted.items() if (params[k].requires_grad if recompute else v.requires_grad)]
    T = lead_tensor(xq).shape[0]
    chunk = query_chunk or T
    ok_parts, grad_parts, loss_sum, acc_sum = [], [], 0.0, 0.0
    for start in range(0, T, chunk):
        part = slice(start, start + chunk)
        # Leaves per chunk (not slices of one leaf, whose backward would fill a whole-batch buffer per chunk).
        leaves = {k: v[part].detach().requires_grad_(k in names) for k, v in result.adapted.items()}
        loss_t, acc_t, ok = _query_losses(task_model, leaves, map_inputs(lambda t: t[part], xq), yq[part], result.task_ok[part], settings,
                                          first_task=start)
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
    metrics = _meta_metrics(result, loss_sum / n_ok, acc_sum / n_ok, ok)
    return {**metrics, **inner_step_metrics(result.logs)} if log_inner_steps else metrics


def _imaml_backward(params, task_batch, settings: InnerLoopSettings, task_model: TaskModel, *, lrs,
                    config: MAMLConfig, track_curve: bool, scale: float) -> dict[str, float]:
    """iMAML: the proximal inner loop without a graph, then `scale` times the mean over the kept
    tasks of the implicit meta-gradient (imaml.py) into the parameters' .grad."""
    settings = settings.replace(first_order=True, no_graph=True, proximal=config.imaml_lambda)
    names = settings.adapted_names(params)
    left_out = [k for k, v in params.items() if v.requires_grad and k not in names]
    if left_out:
        raise ValueError(f"iMAML's meta-gradient reaches the adapted weights only, so every trained parameter must be "
                         f"adapted: {left_out[:4]} are not (leave adapt_params unset, or freeze them)")
    xs, ys, xq, yq = _checked_task_batch(task_batch, settings)
    result = adapt_tasks(params, (xs, ys), model=task_model, settings=settings, lrs=lrs,
                         query_batch=(xq, yq) if track_curve else None)
    dtype = compute_dtype(next(iter(params.values())).dtype)
    with ops.use_backend(settings.backend or ops.current_backend()):
        v, loss_t, acc_t = implicit_meta_gradient(task_model, {k: result.adapted[k] for k in names},
                                                  compute_inputs(xs, dtype), ys, compute_inputs(xq, dtype), yq,
                                                  settings, config.imaml_lambda + config.imaml_damping,
                                                  config.imaml_cg_steps)
    ok = result.task_ok & torch.isfinite(loss_t) & torch.stack([torch.isfinite(t).reshape(t.shape[0], -1).all(1)
                                                                for t in v]).all(0)
    if not bool(ok.all()) and settings.on_nonfinite == "raise" and bool((result.task_ok & ~ok).any()):
        raise NonFiniteLossError(f"non-finite query loss or implicit meta-gradient for task(s) "
                                 f"{(result.task_ok & ~ok).nonzero().flatten().tolist()}; lower the inner lr, raise "
                                 "imaml_lambda or imaml_damping, or set skip_nonfinite_tasks=True")
    n_ok = max(int(ok.sum()), 1)
    keep = lambda t: torch.where(task_view(ok, t), t, torch.zeros_like(t))
    grads = [keep(t).sum(0).mul_(scale / n_ok) for t in v]
    torch.autograd.backward([params[k] for k in names], [g.to(params[k].dtype) for k, g in zip(names, grads)])
    loss = float(keep(loss_t).sum()) / n_ok
    return _meta_metrics(result, loss, float(keep(acc_t).sum()) / n_ok, ok)


def _checked_task_batch(task_batch, settings: InnerLoopSettings):
    """(x_support, y_support, x_query, y_query), checked: shapes, label types, tasks, samples."""
    xs, ys, xq, yq = batch_parts(task_batch)
    xs, ys = as_task_batch(xs, ys, "support", settings.loss)
    xq, yq = as_task_batch(xq, yq, "query", settings.loss)
    if lead_tensor(xs).shape[0] != lead_tensor(xq).shape[0]:
        raise ValueError(f"support has {lead_tensor(xs).shape[0]} tasks but query has {lead_tensor(xq).shape[0]}; "
                         "they must match")
    check_same_samples(xs, xq)
    return xs, ys, xq, yq


def _adapt_for_meta(params, task_batch, settings: InnerLoopSettings, task_model: TaskModel, *, lrs, with_query: bool,
                    msl_weights: Tensor | None) -> tuple[AdaptResult, Tensor, Tensor]:
    """Checks the task batch and adapts every task on its support set (with_query: also scoring
    the query set after every inner step). Returns (adapt result, x_query, y_query)."""
    xs, ys, xq, yq = _checked_task_batch(task_batch, settings)
    result = adapt_tasks(params, (xs, ys), model=task_model, settings=settings, lrs=lrs,
                         query_batch=(xq, yq) if with_query else None, msl_weights=msl_weights)
    return result, xq, yq


def _query_losses(task_model, adapted, xq, yq, ok, settings: InnerLoopSettings, *, update_stats=False, first_task=0):
    """Per-task query loss and accuracy under the adapted weights, and `ok` without the tasks whose
    loss is not finite (raised about unless settings.on_nonfinite is 'skip'; skipped tasks are rerun
    with zeroed inputs so that no NaN enters the graph). first_task numbers the tasks in messages."""
    final = lambda x: query_pass(task_model, adapted, x, yq, step=settings.steps, settings=settings,
                                 update_stats=update_stats)
    with ops.use_backend(settings.backend or ops.current_backend()):
        loss_t, acc_t = final(xq)
        bad = ~torch.isfinite(loss_t.detach()) & ok
        if bool(bad.any()):
            tasks = (bad.nonzero().flatten() + first_task).tolist()
            if settings.on_nonfinite == "raise":
                raise NonFiniteLossError(f"non-finite query loss after adaptation for task(s) {tasks}; check the query "
                                         "inputs, lower the inner lr, or set skip_nonfinite_tasks=True")
            ok = ok & ~bad
            loss_t, acc_t = final(map_inputs(lambda t: torch.where(task_view(bad, t), torch.zeros_like(t), t), xq))
    return loss_t, acc_t, ok


def _kept(adapted: dict[str, Tensor], task_ok: Tensor | None) -> dict[str, Tensor]:
    """The adapted weights of the tasks that were not skipped (Reptile averages only those)."""
    if task_ok is None or bool(task_ok.all()):
        return adapted
    return {k: v[task_ok] for k, v in adapted.items()}


def _cat_inputs(a, b):
    """Support and query inputs side by side in the sample dim (one tensor, or several)."""
    if isinstance(a, Tensor):
        return torch.cat([a, b], 1)
    if isinstance(a, dict):
        return {k: _cat_inputs(a[k], b[k]) for k in a}
    return type(a)(_cat_inputs(u, v) for u, v in zip(a, b))


def _detached(lrs):
    """The rates without their graph (evaluation): a float, a table, or per-element rates."""
    if isinstance(lrs, dict):
        return {k: v.detach() for k, v in lrs.items()}
    return lrs.detach() if isinstance(lrs, Tensor) else lrs


INNER_STEP_FIELDS = ("loss", "accuracy", "grad_norm", "update_norm", "lr_mean", "clip_factor")


def inner_step_metrics(logs: list[StepLog]) -> dict[str, float]:
    """The inner loop's StepLogs as flat metrics, inner{k}_{field} for inner step k (0-based): flat
    so that they average over task chunks and ranks like the other metrics of a step."""
    return {f"inner{log.step}_{name}": float(getattr(log, name)) for log in logs for name in INNER_STEP_FIELDS}


def _meta_metrics(result: AdaptResult, loss: Tensor | float, post: float, ok: Tensor) -> dict[str, float]:
    pre = result.curve_accuracy[0] if result.curve_accuracy else math.nan
    return {"pre_adapt_acc": pre, "post_adapt_acc": post, "fast_gain": post - pre,
            "auac": auac(result.curve_accuracy) if result.curve_accuracy else math.nan,
            "query_loss": float(loss), "skipped_tasks": int((~ok).sum()),
            "adaptation_loss_growth": _loss_growth(result.logs, float(loss))}


DIVERGENCE = 100.0  # an inner loss this many times its start: the inner loop diverges


def _loss_growth(logs: list[StepLog], query_loss: float) -> float:
    """How many times the loss grew within the adaptation: the largest of each inner step's support
    loss and the query loss after adaptation, over the support loss at inner step 0 (<= 1 when
    adaptation helps; a finite loss can still explode: inner_lr=1e6 gives a query loss of 1e22)."""
    if not logs or not logs[0].loss > 0:
        return math.nan
    later = [log.loss for log in logs[1:]] + [query_loss]
    return max(later) / logs[0].loss


class MetaLearner(Learner):
    """Outer loop of one model: MAML / FOMAML (meta-gradient + optimiser) or Reptile
    (theta += eps * (mean adapted - theta), eps decaying linearly), with the MAML++ options of
    `mamlpp` (learned per-step rates, multi-step loss, derivative-order annealing, BN modes).

    The meta-batch adapts together; `config.task_chunk` bounds memory by adapting that many tasks
    at a time and accumulating the meta-gradient. `loss_fn(outputs, targets) -> scalar` replaces
    config.loss; `adapt_params` (names or a predicate(name, tensor)) adapts a subset (ANIL: the
    head, BOIL: the body); parameters with requires_grad=False are neither adapted nor trained.
    meta_sgd: learned per-element inner rates (Meta-SGD), one rate tensor of each adapted
    parameter's shape, starting at config.inner_lr and trained by the outer optimiser.
    debug_batching: on the first step, check that the model's forward does not mix tasks when they
    are batched (meta_kernels.meta.batching.check_task_independence)."""

    def __init__(self, model: nn.Module, config: MAMLConfig, *, mamlpp: MAMLPlusPlusConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, task_batching: str = "auto",
                 compile: bool | str = False, loss_fn=None, adapt_params=None, meta_sgd: bool = False,
                 debug_batching: bool = True):
        config = checked_config(config, "MetaLearner")
        if not isinstance(model, nn.Module):
            raise TypeError(f"MetaLearner: model must be a torch nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"MetaLearner: no parameter of {type(model).__name__} requires grad, so it would train "
                             "nothing; unfreeze the parameters to meta-train (p.requires_grad_(True))")
        _check_compile(compile)
        meta_sgd, debug_batching = checked_flag(meta_sgd, "meta_sgd"), checked_flag(debug_batching, "debug_batching")
        if mamlpp is not None and not isinstance(mamlpp, MAMLPlusPlusConfig):
            hint = " (a dict of fields: MAMLPlusPlusConfig(**fields))" if isinstance(mamlpp, dict) else ""
            raise TypeError(f"MetaLearner: mamlpp must be a MAMLPlusPlusConfig or None{hint}; got {type(mamlpp).__name__}")
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
        self.settings = InnerLoopSettings.from_config(config, bn_mode=self.mamlpp.bn_mode, loss=loss_fn or config.loss,
                                                      adapt_params=adapt_params)
        device = next(model.parameters()).device
        # LSLR: one learned rate per parameter tensor and inner step, trained by the outer optimiser.
        self.lslr = (nn.Parameter(torch.full((K, len(names)), float(config.inner_lr), device=device))
                     if self.mamlpp.use_lslr else None)
        self.msl_logits = (nn.Parameter(torch.zeros(K, device=device))
                           if self.mamlpp.use_msl and self.mamlpp.msl_weights == "learned" else None)
        if meta_sgd and self.lslr is not None:
            raise ValueError("meta_sgd (per-element rates) and use_lslr (per-layer, per-step rates) exclude each other")
        self.meta_sgd_rates = ({k: nn.Parameter(torch.full_like(p.detach(), float(config.inner_lr)))
                                for k, p in model.named_parameters() if k in self.settings.adapted_names(
                                    dict(model.named_parameters()))} if meta_sgd else None)
        extra = [p for p in (self.lslr, self.msl_logits) if p is not None] + list((self.meta_sgd_rates or {}).values())
        outer = torch.optim.Adam if config.meta_optimizer == "adam" else torch.optim.SGD
        if optimizer is None and outer is torch.optim.Adam and any(p.dtype == torch.float16 for p in model.parameters()):
            # Adam's second moment (g^2 / 1000) and eps (1e-8) underflow to 0 in float16: the first
            # meta-update divides by zero. The inner loop itself computes in float32 either way.
            raise ValueError("MetaLearner: the model's weights are float16, which torch.optim.Adam (the default "
                             "meta_optimizer) cannot update: its second moment and eps underflow to 0 in float16 and "
                             "the first meta-update makes every weight inf/NaN. Keep the model float32 (float16 inputs "
                             "are fine: the inner loop runs in float32), use bfloat16 weights, set "
                             "meta_optimizer='sgd', or pass optimizer=... of your own")
        # LSLR with its own meta-lr: a second group (one group otherwise, as checkpoints expect)
        own = [] if self.mamlpp.lslr_meta_lr is None else [{"params": [self.lslr], "lr": self.mamlpp.lslr_meta_lr}]
        shared = [p for p in extra if not (own and p is self.lslr)]
        self.optimizer = optimizer or outer([{"params": list(model.parameters()) + shared}, *own], lr=config.meta_lr)
        if optimizer is not None:
            _check_optimizer(optimizer, model)
            if shared:
                self.optimizer.add_param_group({"params": shared})
            for group in own:
                self.optimizer.add_param_group(group)
        self.outer_steps = 0
        # inner_state='carried' (Reptile): the inner optimizer's state the next outer step's tasks start from
        self.carried_state: CarriedState | None = None
        self._said_divergence = False
        # On the first step, a cheap check that the forward does not mix the tasks folded into one
        # batch (two tasks: one batched forward and one alone, no graph); debug_batching=False skips it.
        self.debug_batching = debug_batching and self.task_model.mode == "batched"

    def _check_bn_mode(self) -> None:
        mode = self.mamlpp.bn_mode
        problem = bn_mode_error(mode, self.config)
        if problem:
            raise ValueError(f"bn_mode {problem}")
        if mode == "transductive":
            return
        if self.task_model.mode != "batched" or not self.task_model.engine.has_step_batch_norm():
            raise ValueError(f"bn_mode {mode!r} needs StepBatchNorm layers (meta_kernels.models.Conv4) on the "
                             f"task-batching engine; {type(self.model).__name__} supports only 'transductive' "
                             "(set mamlpp.bn_mode=transductive)")
        if mode == "per_step":
            bn = [p for n, p in self.model.named_parameters() if n.endswith("bn.weight")]
            need = self.config.inner_steps + 1
            if not bn or any(p.dim() != 2 or p.shape[0] < need for p in bn):
                raise ValueError(f"bn_mode 'per_step' needs BatchNorm affine rows for every inner step: build the "
                                 f"model with Conv4(..., bn_steps={need}) (inner_steps + 1)")

    # ---- MAML++ state ------------------------------------------------------------------------
    def inner_lrs(self):
        """The inner rates used now: the per-element rates (Meta-SGD), the clamped LSLR table, or
        config.inner_lr."""
        if self.meta_sgd_rates is not None:
            return self.meta_sgd_rates
        if self.lslr is None:
            return self.config.inner_lr
        return self.lslr.clamp(LSLR_MIN, LSLR_MAX)

    def current_msl_weights(self, epoch: int) -> Tensor | None:
        p = self.mamlpp
        if not p.use_msl or self.config.algo == "reptile":
            return None
        if p.msl_weights == "uniform" and epoch >= p.msl_decay_epochs:
            # As the paper's code: once its schedule ends, only the last step's query loss counts,
            # which spares a query pass per inner step (MSL steps cost 1.7x plain ones on CPU).
            return None
        return msl_weights(p.msl_weights, self.config.inner_steps, epoch, logits=self.msl_logits,
                           decay_epochs=p.msl_decay_epochs).to(next(self.model.parameters()).device)

    def first_order_at(self, epoch: int) -> bool:
        """Derivative-order annealing: first order before annealing_start_epoch, then the algorithm's."""
        if self.mamlpp.use_annealing and epoch < self.mamlpp.annealing_start_epoch:
            return True
        return self.config.first_order

    def state_dict(self) -> dict:
        carried = self.carried_state
        return {"outer_steps": self.outer_steps, "optimizer": self.optimizer.state_dict(),
                "carried_inner_state": None if carried is None else
                {"state": [[s.clone() for s in kind] for kind in carried.state], "steps": carried.steps},
                "lslr": None if self.lslr is None else self.lslr.detach().clone(),
                "msl_logits": None if self.msl_logits is None else self.msl_logits.detach().clone(),
                "meta_sgd_rates": None if self.meta_sgd_rates is None else
                {k: v.detach().clone() for k, v in self.meta_sgd_rates.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("outer_steps", "optimizer") if not isinstance(state, dict) or k not in state]
        if missing:
            got = list(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"MetaLearner.load_state_dict: the state lacks {missing} (got {got}); pass what "
                             "MetaLearner.state_dict() returned (a checkpoint's 'learner' entry)")
        for name in ("lslr", "msl_logits"):
            mine, saved = getattr(self, name), state.get(name)
            if (mine is None) != (saved is None) or (mine is not None and mine.shape != saved.shape):
                raise ValueError(f"checkpoint {name} {None if saved is None else list(saved.shape)} does not match this "
                                 f"learner's {None if mine is None else list(mine.shape)}: the MAML++ settings or the "
                                 "model differ")
            if mine is not None:
                with torch.no_grad():
                    mine.copy_(saved)
        saved = state.get("meta_sgd_rates")
        if (self.meta_sgd_rates is None) != (saved is None) or (saved is not None and set(saved) != set(self.meta_sgd_rates)):
            raise ValueError("checkpoint meta_sgd_rates do not match this learner's: meta_sgd or the model differ")
        for k, v in (saved or {}).items():
            with torch.no_grad():
                self.meta_sgd_rates[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.outer_steps = state["outer_steps"]
        self.load_carried_state(state.get("carried_inner_state"))

    def load_carried_state(self, saved: dict | None) -> None:
        """The carried inner optimizer state of a state_dict (inner_state='carried'; None: none yet)."""
        self.carried_state = None if saved is None else CarriedState(
            [[s.clone() for s in kind] for kind in saved["state"]], int(saved["steps"]))

    def reptile_epsilon(self) -> float:
        return reptile_epsilon(self.config, self.outer_steps)

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate_tasks(self, task_batch) -> TaskScores:
        """First-order adaptation without a graph on each support set, scored on the query set after
        every inner step. Runs under no_grad and never touches the model's running statistics.
        With inner_state='carried' the inner optimizer starts from the state training carries (and
        leaves it as it was), as it is part of what Reptile learned."""
        xs, ys, xq, yq = batch_parts(task_batch)
        lrs = self.inner_lrs()
        settings = self.settings.replace(first_order=True, no_graph=True, engine="custom", on_nonfinite="raise",
                                         inner_batch=0)
        with torch.no_grad():
            result = adapt_tasks(dict(self.model.named_parameters()), (xs, ys), model=self.task_model,
                                 settings=settings, lrs=_detached(lrs),
                                 query_batch=(xq, yq), start_state=self.carried_state)
        return TaskScores(result.curve_accuracy_per_task, result.curve_loss_per_task[:, -1])

    # ---- the outer step ----------------------------------------------------------------------
    def step(self, task_batch, *, epoch: int = 0, track_curve: bool = False,
             total_tasks: int | None = None, log_inner_steps: bool = False) -> dict[str, float]:
        """One outer step on a meta-batch; returns metrics averaged over its tasks (log_inner_steps:
        also each inner step's support loss, accuracy, gradient and update norms, rate and clip
        factor, as inner{k}_{field}; see inner_step_metrics).

        Under torch.distributed, `task_batch` is this rank's shard and `total_tasks` the size of
        the whole meta-batch: gradients (or Reptile's adapted weights) are summed over ranks, so
        every rank takes the step the unsharded meta-batch would give."""
        parts = batch_parts(task_batch)
        device = next(self.model.parameters()).device
        for (x, y), name in (((parts[0], parts[1]), "support"), ((parts[2], parts[3]), "query")):
            check_tensors(x, y, name)
            check_devices(x, y, device, name)
        single = self.config.loss == "cross_entropy" and parts[1].dim() == 1
        local = 1 if single else lead_tensor(parts[0]).shape[0]
        if local == 0:
            raise ValueError("MetaLearner.step: the task batch holds 0 tasks; give at least one task ([T, N, ...] "
                             "inputs with T >= 1)")
        total = total_tasks or local
        if self.debug_batching and local >= 2:
            # In the inner loop's compute dtype, weights and inputs alike (half weights meet float32 inputs there).
            dtype = compute_dtype(next(self.model.parameters()).dtype)
            weights = {k: to_compute(v.detach()) for k, v in self.model.named_parameters()}
            check_task_independence(self.model, compute_inputs(map_inputs(lambda t: t[:2], parts[0]), dtype), weights)
            self.debug_batching = False
        self.optimizer.zero_grad(set_to_none=True)
        totals, adapted, states = self._accumulate(parts, single, local, total, epoch, track_curve, log_inner_steps)
        if states is not None:
            self._carry_inner_state(states)
        if distributed.world()[1] > 1:
            totals, adapted = self._sum_over_ranks(totals, adapted, local, total)
        all_skipped = totals.get("skipped_tasks", 0) >= total
        if self.config.algo == "reptile":
            update = adapted[0].shape[0] > 0  # the mean of the kept tasks only
        else:
            update = not all_skipped and self._finite_meta_gradient()
        if update:
            self._apply_update(adapted)
        else:  # no step, and no gradient left behind for the next one
            self.optimizer.zero_grad(set_to_none=True)
        self.outer_steps += 1
        metrics = {k: (v / total if k != "skipped_tasks" else v) for k, v in totals.items()}
        if metrics.get("adaptation_loss_growth", 0.0) > DIVERGENCE and not self._said_divergence:
            self._said_divergence = True
            warnings.warn(f"MetaLearner: the inner loop diverges: at outer step {self.outer_steps} the loss grew "
                          f"{metrics['adaptation_loss_growth']:.3g}x within the adaptation (query loss after it "
                          f"{metrics.get('query_loss', math.nan):.3g}); lower the inner lr (inner_lr="
                          f"{self.config.inner_lr}) or set inner_clip. The metric adaptation_loss_growth tracks it "
                          "(said once)", stacklevel=2)
        if all_skipped:  # nothing was measured: NaN (null in metrics.jsonl), not 0.0
            warnings.warn(f"MetaLearner: every task of the meta-batch ({total}) was skipped for a non-finite inner loss "
                          f"(skip_nonfinite_tasks=True): no meta-update at outer step {self.outer_steps}; check the "
                          "inputs for NaN / inf, or lower the inner lr", stacklevel=2)
            metrics = {k: (v if k == "skipped_tasks" else math.nan) for k, v in metrics.items()}
        return {**metrics, "skipped_step": float(not update)}

    def _finite_meta_gradient(self) -> bool:
        """Whether every meta-gradient is finite; a non-finite one raises, naming the outer step
        and the parameters, unless non-finite tasks are skipped (then the step is skipped)."""
        named = {id(p): n for n, p in self.model.named_parameters()}
        named.update({id(p): n for n, p in (("lslr", self.lslr), ("msl_logits", self.msl_logits)) if p is not None})
        named.update({id(p): f"meta_sgd_rates.{n}" for n, p in (self.meta_sgd_rates or {}).items()})
        grads = [(p, p.grad) for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
            return True
        if self.settings.on_nonfinite == "raise":
            bad = [named.get(id(p), "?") for p, g in grads if not bool(torch.isfinite(g).all())]
            raise NonFiniteLossError(f"non-finite meta-gradient at outer step {self.outer_steps + 1} in "
                                     f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; it was not applied. Lower "
                                     "the inner or meta lr, set inner_clip, or set skip_nonfinite_tasks=True to skip "
                                     "such steps")
        return False

    def _accumulate(self, parts, single: bool, local: int, total: int, epoch: int, track_curve: bool,
                    log_inner_steps: bool = False):
        """Adapts this process's `local` tasks config.task_chunk at a time. MAML / FOMAML
        back-propagate each chunk's share (of `total` tasks) of the meta-objective into .grad;
        Reptile collects the adapted weights. Returns the metric sums (each metric weighted by its
        chunk's tasks) and, for Reptile, the adapted weights [local, *shape] per parameter and with
        inner_state='carried' the inner optimizer's final states of the tasks kept."""
        params = dict(self.model.named_parameters())
        reptile = self.config.algo == "reptile"
        carried = self.config.inner_state == "carried"
        if carried and track_curve:
            raise ValueError("track_curve adapts Reptile on the support set alone to score the query set, and "
                             "inner_state='carried' trains on both: measure the curve with evaluate_tasks instead")
        first_order = self.first_order_at(epoch)
        settings = self.settings.replace(first_order=first_order, no_graph=reptile,
                                         recompute=self.config.recompute_inner and not first_order)
        chunk = self.config.task_chunk or local
        totals: dict[str, float] = {}
        adapted_chunks, state_chunks = [], []
        for start in range(0, local, chunk):
            lrs, msl = self.inner_lrs(), self.current_msl_weights(epoch)  # per chunk: each graph is freed
            sub = parts if single else tuple(map_inputs(lambda t: t[start:start + chunk], p) for p in parts)
            n = 1 if single else sub[1].shape[0]
            if reptile and not track_curve:
                # Reptile's update needs only the adapted weights: no query pass on the hot path.
                adapted, metrics, states = self._reptile_adapt(params, sub, lrs, log_inner_steps)
                adapted_chunks.append(adapted)
                state_chunks.append(states)
            elif self.config.algo == "imaml":
                if msl is not None:
                    raise ValueError("iMAML takes the query loss at the inner loop's solution only: turn off use_msl")
                metrics = _imaml_backward(params, sub, settings, self.task_model, lrs=lrs, config=self.config,
                                          track_curve=track_curve, scale=n / total)
            elif not reptile and msl is None and settings.bn_mode == "transductive":
                # The query graph a chunk of tasks at a time (config.query_chunk), not all at once.
                metrics = _meta_backward(params, sub, settings, self.task_model, lrs=lrs, track_curve=track_curve,
                                         query_chunk=self.config.query_chunk, scale=n / total,
                                         log_inner_steps=log_inner_steps)
            else:
                out = _meta_loss(params, sub, settings, self.task_model, lrs=lrs, track_curve=track_curve,
                                 msl_weights=msl, update_stats=settings.bn_mode != "transductive")
                metrics = {**out.metrics, **inner_step_metrics(out.logs.inner)} if log_inner_steps else out.metrics
                if reptile:
                    adapted_chunks.append(_kept(out.logs.adapted_params, out.logs.task_ok))
                else:
                    (out.loss * (n / total)).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * (n if k != "skipped_tasks" else 1)
        adapted = [torch.cat([c[k] for c in adapted_chunks]) for k in params] if reptile else None
        states = [[torch.cat(pieces) for pieces in zip(*kinds)] for kinds in zip(*state_chunks)] if carried else None
        return totals, adapted, states

    def _reptile_adapt(self, params, sub, lrs, log_inner_steps: bool = False):
        # Reptile trains each task on all of its examples (support and query alike are training
        # data of a meta-training task), as in Nichol et al. 2018; evaluation adapts on support only.
        xs, ys, xq, yq = batch_parts(sub)
        if ys.dim() == yq.dim() and ys.dim() >= 2:
            xs = _cat_inputs(xs, xq)
            ys = torch.cat([ys, yq], 1)
        carried = self.config.inner_state == "carried"
        result = adapt_tasks(params, (xs, ys), model=self.task_model,
                             settings=self.settings.replace(first_order=True, no_graph=True), lrs=lrs,
                             start_state=self.carried_state if carried else None)
        nan = math.nan
        metrics = {"pre_adapt_acc": nan, "post_adapt_acc": nan, "fast_gain": nan, "auac": nan,
                   "query_loss": nan, "support_loss": result.logs[-1].loss,
                   "skipped_tasks": int((~result.task_ok).sum())}
        if log_inner_steps:
            metrics.update(inner_step_metrics(result.logs))
        states = None
        if carried:
            ok = result.task_ok
            states = [[s[ok] for s in kind] for kind in result.optimizer_state]
        return _kept(result.adapted, result.task_ok), metrics, states

    def _carry_inner_state(self, states: list[list[Tensor]]) -> None:
        """The next outer step's tasks start from the mean of this step's final inner optimizer
        states (over the tasks kept, on every rank), which have seen inner_steps more updates."""
        kept = torch.tensor([float(states[0][0].shape[0])], device=states[0][0].device)
        sums = [s.sum(0) for kind in states for s in kind]
        distributed.all_reduce_sum_(sums + [kept])
        if not kept.item():  # every task skipped: keep the state as it was
            return
        n = len(states[0])
        means = [s / kept for s in sums]
        steps = self.config.inner_steps + (self.carried_state.steps if self.carried_state is not None else 0)
        self.carried_state = CarriedState([means[i:i + n] for i in range(0, len(means), n)], steps)

    def _sum_over_ranks(self, totals: dict[str, float], adapted, local: int, total: int):
        """Turns what this rank accumulated over its tasks into sums over all ranks' tasks, so every
        rank takes the step of the whole meta-batch: the meta-gradients (Reptile: the adapted
        weights, passed on as one "task", their mean), the running BN statistics folded from the
        rank's tasks (weighted by its share of the tasks: the sum then equals folding the statistics
        of the whole meta-batch), and the metric sums."""
        if adapted is not None:  # Reptile: the mean over the tasks kept on every rank
            sums = [a.sum(0) for a in adapted] + [torch.tensor([float(adapted[0].shape[0])], device=adapted[0].device)]
            distributed.all_reduce_sum_(sums)
            kept = int(sums.pop()[0])
            # passed on as one "task", their mean; as none when every task was skipped
            adapted = [(s / kept).unsqueeze(0) if kept else s.unsqueeze(0)[:0] for s in sums]
        else:
            trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
            for p in trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_reduce_sum_([p.grad for p in trainable])
        if self.settings.bn_mode != "transductive":
            stats = [b for b in self.model.buffers() if b.is_floating_point()]
            with torch.no_grad():
                for b in stats:
                    b.mul_(local / total)
                distributed.all_reduce_sum_(stats)
        keys = sorted(totals)
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=next(self.model.parameters()).device)
        distributed.all_reduce_sum_([values])
        return dict(zip(keys, values.tolist())), adapted

    def _apply_update(self, adapted) -> None:
        """Reptile: theta += eps * (mean adapted - theta), or with reptile_update='meta_optimizer' the
        optimiser's step on theta - mean adapted; MAML / FOMAML: the optimiser's step."""
        if self.config.algo == "reptile" and self.config.reptile_update == "meta_optimizer":
            with torch.no_grad():  # the pseudo-gradient theta - mean adapted
                for p, a in zip(self.model.parameters(), adapted):
                    p.grad = p.detach() - a.mean(0).to(p.dtype)
        elif self.config.algo == "reptile":
            epsilon = self.reptile_epsilon()
            if epsilon > 0:  # decayed to 0: no update (the op takes epsilon in (0, 1])
                with torch.no_grad():
                    ops.reptile_update_(list(self.model.parameters()), adapted, epsilon, backend=self.config.backend)
            return
        self.optimizer.step()
        self._check_meta_update()
        if self.lslr is not None:
            with torch.no_grad():  # learned rates never leave the clamp range
                self.lslr.clamp_(LSLR_MIN, LSLR_MAX)

    def _check_meta_update(self) -> None:
        """A finite meta-gradient can still make the weights inf (meta_lr=1e30): say so here, naming
        the meta-optimiser, before the next step blames the inner loop."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
            return
        named = {id(p): n for n, p in self.model.named_parameters()}
        bad = [named.get(id(p), "a learned rate") for p in params if not bool(torch.isfinite(p.detach()).all())]
        lrs = sorted({g.get("lr") for g in self.optimizer.param_groups}, key=str)
        raise NonFiniteLossError(f"the meta-update of outer step {self.outer_steps + 1} by the meta-optimiser "
                                 f"{type(self.optimizer).__name__} (lr {', '.join(map(str, lrs))}) made "
                                 f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} non-finite; lower meta_lr "
                                 "(MAMLConfig.meta_lr or the optimizer's lr)")
