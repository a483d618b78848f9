"""higher's `innerloop_ctx`, for scripts that import

    from meta_kernels.compat import higher

instead of `import higher`:

    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(loss_fn(fmodel(x_support), y_support))
        loss_fn(fmodel(x_query), y_query).backward()

As in higher 0.2:
- `fmodel` is a copy of the model whose weights are "fast weights": `fmodel(x)` runs with the
  latest, `fmodel(x, params=[...])` with (and from then on) the ones given, and
  `fmodel.parameters(time=k)` returns those after k steps (only the latest and the initial ones
  without `track_higher_grads`). Its buffers are copies: BatchNorm's running statistics of the
  original model do not change.
- `copy_initial_weights=True` starts from detached copies of the weights (the meta-gradient does
  not reach the model); `False` from differentiable clones (MAML).
- `diffopt.step(loss)` is the optimizer's update made differentiable, for torch.optim.SGD (lr per
  parameter group, momentum, dampening, nesterov, weight decay) and torch.optim.Adam (amsgrad,
  weight decay), starting from the optimizer's state; weights with requires_grad=False, outside
  every group, or unused by the loss stay as they are. The last operation of each update, w - lr * d,
  is one fused `sgd_step` launch for all weights.
- `override={'lr': [...]}` replaces a setting by one value, or one per parameter group; values may be
  tensors that require grad (learned rates), as may `step(..., override=...)`.
- `track_higher_grads=False` takes first-order gradients and makes every step's weights fresh
  leaves, exactly as higher does: nothing is differentiated through the updates.

Other optimizers raise, naming the supported ones.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from meta_kernels.compat._common import OneTaskRunner, clone_tree, fused_sgd, replace_weights
from meta_kernels.meta.inner_common import lead_tensor
from meta_kernels.meta.task_model import TaskModel

SUPPORTED_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam")


@contextmanager
def innerloop_ctx(model: nn.Module, opt: torch.optim.Optimizer, device=None, copy_initial_weights: bool = True,
                  override: dict | None = None, track_higher_grads: bool = True, tasks: int | None = None):
    """Yields (fmodel, diffopt): the model with fast weights and the differentiable optimizer.

    tasks=T (ours, not higher's) is the batched form: every fast weight carries a task dim
    [T, *shape], fmodel takes inputs [T, N, ...] and returns [T, N, ...] on the task-batching
    engine, and diffopt.step takes the sum of the per-task losses (meta_kernels.compat.task_sum),
    so each task is updated with its own gradient (and its own momentum or Adam moments)."""
    fmodel = monkeypatch(model, device, copy_initial_weights=copy_initial_weights,
                         track_higher_grads=track_higher_grads, tasks=tasks)
    yield fmodel, get_diff_optim(opt, model.parameters(), fmodel=fmodel, device=device, override=override,
                                 track_higher_grads=track_higher_grads)


def monkeypatch(model: nn.Module, device=None, copy_initial_weights: bool = True,
                track_higher_grads: bool = True, tasks: int | None = None) -> "FunctionalModule":
    """The model with fast weights (higher.monkeypatch); `tasks` as in innerloop_ctx."""
    return FunctionalModule(model, device, copy_initial_weights, track_higher_grads, tasks)


class FunctionalModule(nn.Module):
    """A copy of the model's module tree whose weights are swapped for the fast weights; buffers
    copied once. Attributes not found here are the copied model's (fmodel.fc, fmodel.conv...)."""

    def __init__(self, model: nn.Module, device, copy_initial_weights: bool, track_higher_grads: bool,
                 tasks: int | None = None):
        super().__init__()
        move = (lambda t: t) if device is None else (lambda t: t.to(device))
        self.module = clone_tree(model, weight=lambda p: p, buffer=lambda b: move(b.clone().detach()))
        self.track_higher_grads = track_higher_grads
        originals = list(model.parameters())
        if copy_initial_weights:
            initial = [move(p.detach().clone()).requires_grad_(p.requires_grad) for p in originals]
        else:
            initial = [move(p.clone()) for p in originals]
        self.tasks, self._engine, self._runner = tasks, None, OneTaskRunner(self.module)
        if tasks is not None:
            if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
                raise ValueError(f"tasks must be a positive int (the number of tasks adapted at once), got {tasks!r}")
            self._engine = TaskModel(self.module)
            self._names = [name for name, _ in model.named_parameters()]
            initial = [p.unsqueeze(0).expand(tasks, *p.shape) for p in initial]
        self._in_tree = originals  # the weights the copied tree holds now, in model.parameters() order
        self._fast_params: list[list[Tensor]] = []
        self.update_params(initial)

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], attr)

    @property
    def fast_params(self) -> list[Tensor]:
        return self._fast_params[-1]

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Makes `params` (one tensor per weight, in model.parameters() order) the fast weights."""
        params = list(params)
        if len(params) != len(self._in_tree):
            raise ValueError(f"params holds {len(params)} tensors but the model has {len(self._in_tree)} weights; "
                             "pass one per tensor of model.parameters(), in that order")
        if self._engine is None:  # the batched form passes its weights to the engine at each call
            replace_weights(self.module, {id(old): new for old, new in zip(self._in_tree, params)})
        self._in_tree = params
        if self.track_higher_grads or not self._fast_params:
            self._fast_params.append(params)
        else:
            self._fast_params[0] = params

    def forward(self, *args, params: Iterable[Tensor] | None = None, **kwargs):
        if params is not None:
            self.update_params(params)
        if self._engine is None:
            return self._runner(args, kwargs)
        inputs = args[0] if len(args) == 1 and not kwargs else (args, kwargs)
        T = lead_tensor(inputs).shape[0]
        if T != self.tasks:
            raise ValueError(f"this fmodel adapts {self.tasks} tasks at once, but the inputs hold {T} in dim 0; "
                             f"pass inputs as [{self.tasks}, N, ...]")
        return self._engine(dict(zip(self._names, self.fast_params)), inputs,
                            double_backward=self.track_higher_grads and torch.is_grad_enabled())

    def parameters(self, recurse: bool = True, time: int | None = None):
        time = -1 if time is None else time
        if not self.track_higher_grads and time not in (-1, 0):
            raise ValueError("this fmodel does not track higher grads (track_higher_grads=False): only the latest "
                             "weights are kept; call parameters() or parameters(time=0)")
        return iter(self._fast_params[time])


def get_diff_optim(opt: torch.optim.Optimizer, reference_params: Iterable[Tensor], fmodel: FunctionalModule | None = None,
                   device=None, override: dict | None = None, track_higher_grads: bool = True) -> "DifferentiableOptimizer":
    """The differentiable form of `opt` (higher.optim.get_diff_optim)."""
    kinds = {torch.optim.SGD: DifferentiableSGD, torch.optim.Adam: DifferentiableAdam}
    if type(opt) not in kinds:
        raise ValueError(f"meta_kernels.compat.higher supports {' and '.join(SUPPORTED_OPTIMIZERS)} as inner "
                         f"optimizers, got {type(opt).__module__}.{type(opt).__name__}; use one of those "
                         "(for a learned per-weight rate see meta_kernels.compat.learn2learn.algorithms.MetaSGD)")
    return kinds[type(opt)](opt, reference_params, fmodel=fmodel, device=device, override=override,
                            track_higher_grads=track_higher_grads)


class DifferentiableOptimizer:
    """The inner optimizer's update as differentiable tensor operations."""

    def __init__(self, opt: torch.optim.Optimizer, reference_params: Iterable[Tensor], *, fmodel=None, device=None,
                 override: dict | None = None, track_higher_grads: bool = True):
        reference = list(reference_params)
        index_of = {id(p): i for i, p in enumerate(reference)}
        self.param_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self._group_indices: list[list[int]] = []
        self.state: list[dict[int, dict]] = []
        for group in opt.param_groups:
            indices = []
            for p in group["params"]:
                if id(p) not in index_of:
                    raise ValueError("the optimizer holds a tensor that is not a parameter of the model; "
                                     "build it from model.parameters()")
                indices.append(index_of[id(p)])
            self._group_indices.append(indices)
            # The optimizer's own state (momentum buffers, Adam moments) is where the inner loop starts.
            self.state.append({i: {k: _copied(v, device) for k, v in opt.state[p].items()}
                               for i, p in enumerate(group["params"]) if p in opt.state})
        for group in self.param_groups:
            self._check_group(group)
        if override is not None:
            self._apply_override(override)
        self._fmodel, self._track_higher_grads = fmodel, track_higher_grads

    def _check_group(self, group: dict) -> None:
        if group.get("maximize", False):
            raise ValueError("maximize=True is not supported by the differentiable optimizers; negate the loss instead")

    def _apply_override(self, override: dict) -> None:
        for key, values in override.items():
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if len(values) not in (1, len(self.param_groups)):
                raise ValueError(f"override[{key!r}] holds {len(values)} values but the optimizer has "
                                 f"{len(self.param_groups)} parameter groups; pass one value, or one per group")
            for i, group in enumerate(self.param_groups):
                group[key] = values[0] if len(values) == 1 else values[i]

    def step(self, loss: Tensor, params: Iterable[Tensor] | None = None, override: dict | None = None,
             grad_callback: Callable[[list], list] | None = None) -> list[Tensor]:
        """One differentiable update on `loss`; returns the new fast weights (also set on fmodel)."""
        if override is not None:
            self._apply_override(override)
        if params is None:
            if self._fmodel is None:
                raise ValueError("pass params=... to step(): this optimizer has no fmodel to take the weights from")
            params = self._fmodel.fast_params
        params = list(params)
        targets = [p if p.requires_grad else torch.empty(0, requires_grad=True) for p in params]
        grads = list(torch.autograd.grad(loss, targets, create_graph=self._track_higher_grads, allow_unused=True))
        if grad_callback is not None:
            grads = list(grad_callback(grads))
        moved, directions, rates = [], [], []
        for g_idx, (group, indices) in enumerate(zip(self.param_groups, self._group_indices)):
            for slot, index in enumerate(indices):
                p, g = params[index], grads[index]
                if g is None:
                    continue
                direction, rate = self._direction(group, self.state[g_idx].setdefault(slot, {}), p, g)
                moved.append(index)
                directions.append(direction)
                rates.append(rate)
        new_params = params[:]
        if moved:
            for index, new in zip(moved, fused_sgd([params[i] for i in moved], directions, rates)):
                new_params[index] = new if self._track_higher_grads else new.detach().requires_grad_()
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _direction(self, group: dict, state: dict, p: Tensor, g: Tensor) -> tuple[Tensor, float | Tensor]:
        """(d, rate) of the update p - rate * d."""
        raise NotImplementedError


class DifferentiableSGD(DifferentiableOptimizer):
    """torch.optim.SGD: weight decay, momentum with dampening, nesterov."""

    def _direction(self, group, state, p, g):
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p
        momentum = group["momentum"]
        if momentum != 0:
            if "momentum_buffer" not in state or state["momentum_buffer"] is None:
                buf = g
            else:
                buf = state["momentum_buffer"] * momentum + (1 - group["dampening"]) * g
            state["momentum_buffer"] = buf
            g = g + momentum * buf if group["nesterov"] else buf
        return g, group["lr"]


class DifferentiableAdam(DifferentiableOptimizer):
    """torch.optim.Adam: bias-corrected moments, amsgrad, weight decay (L2, not decoupled)."""

    def _direction(self, group, state, p, g):
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        state["step"] = int(state["step"]) + 1
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p
        exp_avg = state["exp_avg"] = state["exp_avg"] * beta1 + (1 - beta1) * g
        exp_avg_sq = state["exp_avg_sq"] = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
        # sqrt has an infinite derivative at 0: where the second moment is still 0 (a gradient that
        # was always exactly 0) its gradient is taken as 0, as higher does.
        _zero_grad_where(exp_avg_sq, exp_avg_sq == 0)
        if group["amsgrad"]:
            second = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        else:
            second = exp_avg_sq
        denom = second.sqrt() + group["eps"]
        rate = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        return exp_avg / denom, rate


def _zero_grad_where(t: Tensor, mask: Tensor) -> None:
    if not t.requires_grad:
        return

    def hook(grad: Tensor) -> Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:  # and in the gradient of that gradient
            _zero_grad_where(grad, mask)
        return grad

    t.register_hook(hook)


def _copied(v, device):
    if isinstance(v, Tensor):
        v = v.detach().clone()
        return v if device is None else v.to(device)
    return v
