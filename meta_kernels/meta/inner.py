"""The inner loop: T tasks adapt together, every update through the fused ops.

    adapted, logs = adapt(params, (x_support, y_support), model=model, steps=5, lrs=0.4,
                          first_order=False)

`params` are the base weights {name: tensor}; the support batch is x [T, N*K, ...], y [T, N*K]
(a single task without the T dim works too). Adapted weights come back as {name: [T, *shape]}.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import meta_kernels.ops as ops
from meta_kernels.config import BN_MODES, ENGINES
from meta_kernels.meta.task_model import TaskModel

NONFINITE = ("raise", "skip")


class NonFiniteLossError(FloatingPointError):
    """The inner loop produced a NaN/inf loss or gradient; the message names the step and tasks."""


@dataclass
class StepLog:
    """One inner step, averaged over the tasks that were not skipped (per-task values in *_per_task)."""
    step: int
    loss: float
    accuracy: float
    grad_norm: float
    update_norm: float
    lr_mean: float
    lr_min: float
    lr_max: float
    clip_factor: float = 1.0
    loss_per_task: list[float] = field(default_factory=list)
    # Query loss/accuracy before this step's update (the adaptation curve), when a query set was given.
    query_loss: float | None = None
    query_accuracy: float | None = None


@dataclass
class AdaptResult:
    adapted: dict[str, Tensor]
    logs: list[StepLog]
    # Query loss and accuracy after 0..steps updates (filled when a query batch was given).
    curve_loss: list[float]
    curve_accuracy: list[float]
    task_ok: Tensor  # [T] bool, False for tasks skipped after a non-finite loss
    msl_loss_per_task: Tensor | None = None  # [T] sum_k w_k query loss after k+1 updates (MSL)
    # recompute=True: back-propagates d(objective)/d(adapted weights) ([T, *shape] per parameter,
    # in order) through the inner loop, rebuilding one step's second-order graph at a time.
    backward: Callable[[list[Tensor]], None] | None = None


LOSSES = ("cross_entropy", "mse")


def _as_task_batch(x: Tensor, y: Tensor, name: str, loss: str = "cross_entropy") -> tuple[Tensor, Tensor]:
    """Adds the task dim to a single classification task; checks shapes and label types.

    cross_entropy: x [T, N, ...], y [T, N] integer classes (or one task: x [N, ...], y [N]).
    mse: x [T, N, ...], y [T, N, ...] float targets."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "cross_entropy" and y.dim() == 1:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if y.dim() < 2 or x.dim() < 2 or x.shape[:2] != y.shape[:2] or (loss == "cross_entropy" and y.dim() != 2):
        want = "y [T, N]" if loss == "cross_entropy" else "y [T, N, ...]"
        raise ValueError(f"{name}: x must be [T, N, ...] and {want}; got x {list(x.shape)} and y {list(y.shape)}")
    if y.shape[1] == 0:
        raise ValueError(f"{name} set is empty: it needs at least one example per task")
    if loss == "cross_entropy" and y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} labels must be integer class indices for cross_entropy, got {y.dtype}")
    return x, y


def _check_labels(y: Tensor, n_out: int, name: str) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_out:
        raise ValueError(f"{name} labels must lie in [0, {n_out}) for a {n_out}-way output, got labels in [{lo}, {hi}]; "
                         "remap labels to 0..n_way-1 per episode")


def lr_table(lrs, steps: int, names: list[str], device, dtype=torch.float32) -> Tensor:
    """[steps, n_params] learning rates from a float, a per-parameter vector, or a full table
    (a float becomes a tensor of the params' precision, so float64 runs keep exact rates)."""
    if isinstance(lrs, (int, float)):
        if not lrs > 0:
            raise ValueError(f"inner lr must be > 0, got {lrs}")
        return torch.full((steps, len(names)), float(lrs), device=device, dtype=dtype)
    lrs = torch.as_tensor(lrs, device=device)
    if lrs.dim() == 1 and lrs.numel() == len(names):
        return lrs.unsqueeze(0).expand(steps, -1)
    if lrs.dim() == 2 and tuple(lrs.shape) == (steps, len(names)):
        return lrs
    raise ValueError(f"lrs must be a float, [{len(names)}] (one per parameter) or [{steps}, {len(names)}] "
                     f"(per step and parameter), got shape {list(lrs.shape)}")


def _at_least_fp32(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (the inner loop never runs in half precision); fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_task_loss(outputs: Tensor, y: Tensor, loss: str = "cross_entropy", name: str = "support"):
    """(loss [T], accuracy [T]) of each task; accuracy is NaN for regression."""
    T, N = y.shape[:2]
    if loss == "mse":
        if outputs.shape != y.shape:
            raise ValueError(f"{name}: model outputs {list(outputs.shape)} do not match targets {list(y.shape)}")
        per = (outputs - y.to(outputs.dtype)).pow(2).reshape(T, -1).mean(1)
        return per, torch.full((T,), math.nan, device=y.device)
    _check_labels(y, outputs.shape[-1], name)
    per = F.cross_entropy(outputs.reshape(T * N, -1), y.reshape(-1), reduction="none").view(T, N).mean(1)
    return per, (outputs.detach().argmax(-1) == y).float().mean(1)


def _masked_mean(v: Tensor, ok: Tensor) -> float:
    return float(v[ok].mean()) if bool(ok.any()) else math.nan


def adapt(params: dict[str, Tensor], support_batch, *, model, steps: int, lrs, first_order: bool,
          bn_mode: str = "transductive", rng: torch.Generator | None = None, inner_clip: float | None = None,
          engine: str = "custom", backend: str | None = None, no_graph: bool = False, query_batch=None,
          on_nonfinite: str = "raise", loss: str = "cross_entropy",
          msl_weights: Tensor | None = None) -> tuple[dict[str, Tensor], list[StepLog]]:
    """Adapts `params` on the support set of every task; returns (adapted_params, inner_logs).

    first_order=False keeps the second-order graph (MAML): adapted params keep grad_fn.
    first_order=True (FOMAML) uses gradients without create_graph; adapted params still depend
    on `params` through the identity path. no_graph=True (Reptile, evaluation) builds no graph
    and updates in place. The inner loop always computes in float32 (autocast off).

    lrs: a float, one rate per parameter, or a [steps, n_params] table (LSLR; may require grad).
    bn_mode: 'transductive' (statistics of the current set), 'per_step' (the same, with the BN
    affine row of the current step), 'frozen' (running statistics; BN affine not adapted).
    msl_weights [steps]: with a query batch, the multi-step loss sum_k w_k L_query(after k+1
    updates) is returned in AdaptResult.msl_loss_per_task (adapt_tasks)."""
    result = adapt_tasks(params, support_batch, model=model, steps=steps, lrs=lrs, first_order=first_order,
                         bn_mode=bn_mode, rng=rng, inner_clip=inner_clip, engine=engine, backend=backend,
                         no_graph=no_graph, query_batch=query_batch, on_nonfinite=on_nonfinite, loss=loss,
                         msl_weights=msl_weights)
    return result.adapted, result.logs


def adapt_tasks(params, support_batch, *, model, steps, lrs, first_order, bn_mode="transductive", rng=None,
                inner_clip=None, engine="custom", backend=None, no_graph=False, query_batch=None,
                on_nonfinite="raise", loss="cross_entropy", msl_weights=None, recompute=False) -> AdaptResult:
    """`adapt` with everything it measured (adaptation curve, skipped tasks).

    recompute=True (second order only): the inner loop runs without a graph, keeping each step's
    starting weights; AdaptResult.backward then rebuilds the steps' second-order graphs one at a
    time, last first, so memory holds one step's graph instead of all of them, for one more
    first-order pass of compute. The gradients are those of backward through the full graph."""
    task_model = model if isinstance(model, TaskModel) else TaskModel(model)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "higher":
        from meta_kernels.meta.higher_engine import adapt_with_higher
        if bn_mode != "transductive" or msl_weights is not None:
            raise ValueError("engine='higher' supports neither bn_mode other than 'transductive' nor MSL; use 'custom'")
        return adapt_with_higher(params, support_batch, task_model=task_model, steps=steps, lrs=lrs,
                                 first_order=first_order, no_graph=no_graph, inner_clip=inner_clip,
                                 query_batch=query_batch, loss=loss)
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {', '.join(BN_MODES)}")
    if msl_weights is not None and (query_batch is None or tuple(msl_weights.shape) != (steps,)):
        raise ValueError(f"msl_weights must be [{steps}] (one per inner step) and needs a query batch, "
                         f"got {None if msl_weights is None else list(msl_weights.shape)}")
    if recompute and (first_order or no_graph or msl_weights is not None):
        raise ValueError("recompute=True rebuilds the second-order graph of MAML: it needs first_order=False, "
                         "no_graph=False and no multi-step loss (msl_weights)")
    if on_nonfinite not in NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE}, got {on_nonfinite!r}")
    if not params:
        raise ValueError("params is empty; pass model.named_parameters() as a dict")
    x, y = _as_task_batch(*support_batch, "support", loss)
    if query_batch is not None:
        xq, yq = _as_task_batch(*query_batch, "query", loss)
        if xq.shape[0] != x.shape[0]:
            raise ValueError(f"support has {x.shape[0]} tasks but query has {xq.shape[0]}; they must match")
    T = x.shape[0]
    names = list(params)
    first = next(iter(params.values()))
    device = first.device
    table = lr_table(lrs, steps, names, device, torch.float64 if first.dtype == torch.float64 else torch.float32)
    if bn_mode == "frozen":  # statistics and affine stay fixed during the inner loop
        keep = torch.tensor([0.0 if ".bn." in n else 1.0 for n in names], dtype=table.dtype, device=device)
        table = table * keep
    fork = torch.random.fork_rng(devices=[]) if rng is not None else contextlib.nullcontext()
    # Called under torch.no_grad() (evaluation): adapt without a graph; the inner gradients
    # themselves still need autograd, hence enable_grad below.
    no_graph = no_graph or not torch.is_grad_enabled()

    with fork, torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False), \
            ops.use_backend(backend or ops.current_backend()):
        if rng is not None:  # stochastic layers (dropout) draw from the caller's stream
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
        x = _at_least_fp32(x)
        base = {k: _at_least_fp32(v) for k, v in params.items()}
        skipped = torch.zeros(T, dtype=torch.bool, device=device)
        while True:
            try:
                return _run_steps(task_model, base, x, y, xq if query_batch is not None else None,
                                  yq if query_batch is not None else None, table, skipped, steps=steps,
                                  first_order=first_order, no_graph=no_graph, inner_clip=inner_clip, engine=engine,
                                  loss=loss, on_nonfinite=on_nonfinite, bn_mode=bn_mode, msl_weights=msl_weights,
                                  recompute=recompute)
            except _SkipTasks as skip:
                # Rerun with those tasks' inputs zeroed: their graph must hold no inf/NaN, or the
                # masked-out gradient (0 * NaN) would still poison the shared meta-gradient.
                skipped = skipped | skip.bad
                x = torch.where(skipped.view(-1, *([1] * (x.dim() - 1))), torch.zeros_like(x), x)


class _SkipTasks(Exception):
    def __init__(self, bad: Tensor):
        self.bad = bad


def _run_steps(task_model, base, x, y, xq, yq, table, skipped, *, steps, first_order, no_graph, inner_clip, engine,
               loss, on_nonfinite, bn_mode, msl_weights, recompute=False) -> AdaptResult:
    T = x.shape[0]
    names = list(base)
    no_graph = no_graph or recompute
    starts, rng_states = [], []  # recompute: each step's starting weights (step 0: the base) and RNG state
    if no_graph:
        fast = {k: v.detach().expand(T, *v.shape).clone().requires_grad_(True) for k, v in base.items()}
    else:
        fast = {k: v.expand(T, *v.shape) for k, v in base.items()}
    task_ok = ~skipped
    logs, curve_loss, curve_acc = [], [], []
    msl_total = None

    def query_point(step):
        if xq is None:
            return None, None
        with torch.no_grad():
            ql, qa = per_task_loss(task_model(fast, _at_least_fp32(xq), step=step, bn_mode=bn_mode), yq, loss, "query")
        curve_loss.append(_masked_mean(ql, task_ok))
        curve_acc.append(_masked_mean(qa, task_ok))
        return curve_loss[-1], curve_acc[-1]

    for step in range(steps):
        q_loss, q_acc = query_point(step)
        if recompute:
            starts.append(None if step == 0 else {k: v.detach().clone() for k, v in fast.items()})
            rng_states.append(_rng_state(x.device))
        grads, loss_t, acc_t = _task_gradients(task_model, fast, x, y, engine, loss, step, bn_mode,
                                               create_graph=not first_order and not no_graph)
        if inner_clip is not None:
            norm, factor = ops.clip_grad_norm(grads, inner_clip)
        else:
            with torch.no_grad():
                norm, _ = ops.clip_grad_norm([g.detach() for g in grads], math.inf)
            factor = None
        bad = ~(torch.isfinite(loss_t.detach()) & torch.isfinite(norm.detach())) & task_ok
        if bool(bad.any()):
            if on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"non-finite inner loss or gradient at inner step {step} for task(s) "
                    f"{bad.nonzero().flatten().tolist()} (loss {loss_t.detach()[bad].tolist()}); lower the inner lr, "
                    "set inner_clip, or set skip_nonfinite_tasks=True to skip such tasks")
            raise _SkipTasks(bad)
        if bool(skipped.any()):
            grads = _zero_skipped(grads, task_ok)
        lr_step = table[step]
        logs.append(_step_log(step, loss_t, acc_t, norm, factor, grads, lr_step, task_ok, q_loss, q_acc))
        values = list(fast.values())
        if no_graph:
            with torch.no_grad():
                ops.sgd_step_(values, [g.detach() for g in grads], lr_step.detach(),
                              None if factor is None else factor.detach())
        else:
            fast = dict(zip(names, ops.sgd_step(values, grads, lr_step, factor)))
        if msl_weights is not None:  # multi-step loss: the query loss after this update, with its graph
            q_t, _ = per_task_loss(task_model(fast, _at_least_fp32(xq), step=step + 1, bn_mode=bn_mode), yq, loss, "query")
            term = msl_weights[step].to(q_t.dtype) * q_t
            msl_total = term if msl_total is None else msl_total + term
    query_point(steps)
    if no_graph:
        fast = {k: v.detach() for k, v in fast.items()}

    def backward(adjoint: list[Tensor]) -> None:
        _backward_by_recompute(task_model, base, x, y, table, task_ok, starts, rng_states, adjoint,
                               inner_clip=inner_clip, engine=engine, loss=loss, bn_mode=bn_mode)
    return AdaptResult(fast, logs, curve_loss, curve_acc, task_ok, msl_total, backward if recompute else None)


def _zero_skipped(grads: list[Tensor], task_ok: Tensor) -> list[Tensor]:
    """Zero gradients for skipped tasks: they stay at the base weights."""
    return [torch.where(task_ok.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g)) for g in grads]


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _backward_by_recompute(task_model, base, x, y, table, task_ok, starts, rng_states, adjoint, *, inner_clip,
                           engine, loss, bn_mode) -> None:
    """Back-propagates `adjoint` (d objective / d weights after the last step) through the inner
    loop, last step first: each step's second-order graph is rebuilt from its starting weights
    (with the RNG state it ran with), used for one vector-Jacobian product and freed. Gradients
    reach the base weights (through step 0) and the learning-rate table, as backward through the
    whole graph would."""
    T, steps = x.shape[0], len(starts)
    lr_leaf = table.detach().requires_grad_(table.requires_grad)
    fork = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])
    with fork, torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        for step in reversed(range(steps)):
            _set_rng_state(x.device, rng_states[step])
            if step == 0:
                theta = {k: v.expand(T, *v.shape) for k, v in base.items()}
            else:
                theta = {k: v.requires_grad_(True) for k, v in starts[step].items()}
                starts[step] = None  # freed once used
            grads, _, _ = _task_gradients(task_model, theta, x, y, engine, loss, step, bn_mode, create_graph=True)
            factor = ops.clip_grad_norm(grads, inner_clip)[1] if inner_clip is not None else None
            if not bool(task_ok.all()):  # as in the forward pass
                grads = _zero_skipped(grads, task_ok)
            new = ops.sgd_step(list(theta.values()), grads, lr_leaf[step], factor)
            # Step 0 reaches the base weights (leaves of the caller's graph); later steps stop at
            # their starting weights, whose gradient is the next adjoint.
            wanted = None if step == 0 else list(theta.values()) + ([lr_leaf] if lr_leaf.requires_grad else [])
            torch.autograd.backward(new, adjoint, inputs=wanted)
            if step > 0:
                adjoint = [v.grad for v in theta.values()]
            del theta, grads, factor, new
    if lr_leaf.grad is not None:
        torch.autograd.backward(table, lr_leaf.grad)


def _task_gradients(task_model: TaskModel, fast: dict[str, Tensor], x: Tensor, y: Tensor, engine: str, loss: str,
                    step: int, bn_mode: str, create_graph: bool):
    """Per-task gradients [T, *shape] of each task's support loss, plus per-task loss and accuracy."""
    if engine == "torch_func":
        def total(f):
            loss_t, acc_t = per_task_loss(task_model.forward(f, x, step, bn_mode), y, loss)
            return loss_t.sum(), (loss_t, acc_t)
        # torch.func transforms cannot see through register_autograd ops: the forward inside the
        # transform runs the reference ops; the update outside still uses the fused kernels.
        with ops.use_backend("reference"):
            grads, (loss_t, acc_t) = torch.func.grad(total, has_aux=True)(fast)
        grads = [grads[k] if create_graph else grads[k].detach() for k in fast]
        return grads, loss_t, acc_t
    loss_t, acc_t = per_task_loss(task_model(fast, x, double_backward=create_graph, step=step, bn_mode=bn_mode), y, loss)
    grads = torch.autograd.grad(loss_t.sum(), list(fast.values()), create_graph=create_graph)
    return list(grads), loss_t, acc_t


def _step_log(step, loss_t, acc_t, norm, factor, grads, lr_step, task_ok, q_loss, q_acc) -> StepLog:
    with torch.no_grad():
        lr = lr_step.detach().float()
        # ||update|| per task = sqrt(sum_i (lr_i * factor_t)^2 ||g_i,t||^2)
        sq = torch.stack([g.detach().float().reshape(g.shape[0], -1).pow(2).sum(1) for g in grads])  # [n, T]
        upd = (lr.pow(2).unsqueeze(1) * sq).sum(0).sqrt()
        if factor is not None:
            upd = upd * factor.detach().float()
        return StepLog(step=step, loss=_masked_mean(loss_t.detach(), task_ok), accuracy=_masked_mean(acc_t, task_ok),
                       grad_norm=_masked_mean(norm.detach().float(), task_ok), update_norm=_masked_mean(upd, task_ok),
                       lr_mean=float(lr.mean()), lr_min=float(lr.min()), lr_max=float(lr.max()),
                       clip_factor=1.0 if factor is None else _masked_mean(factor.detach().float(), task_ok),
                       loss_per_task=loss_t.detach().tolist(), query_loss=q_loss, query_accuracy=q_acc)
