"""higher.optim: differentiable forms of torch.optim.SGD and torch.optim.Adam.

`diffopt.step(loss)` is the optimizer's update made differentiable, for torch.optim.SGD (lr per
parameter group, momentum, dampening, nesterov, weight decay) and torch.optim.Adam (amsgrad,
weight decay), starting from the optimizer's state; weights with requires_grad=False, outside
every group, or unused by the loss stay as they are. `override={'lr': [...]}` replaces a setting by
one value, or one per parameter group; values may be tensors that require grad (learned rates), as
may `step(..., override=...)`. `track_higher_grads=False` takes first-order gradients and makes
every step's weights fresh leaves, as higher does. Other optimizers raise, naming these two.

Adam is torch.optim.Adam's update exactly (eps added to sqrt(v) / sqrt(1 - beta2^t), step lr / (1 - beta1^t));
higher 0.2.1 keeps PyTorch 1.5's form, with eps inside the bias correction (31.6x larger at step 1
with the default betas), so its weights differ from torch.optim.Adam's and ours by about eps."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from meta_kernels.compat._common import check_finite, check_loss, checked_rate, sgd_update, stepped_entries
from meta_kernels.compat._tasks import checked_task_loss
from meta_kernels.meta.factored import entry_grads, formed

SUPPORTED_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam")


def get_diff_optim(opt: torch.optim.Optimizer, reference_params: Iterable[Tensor], fmodel=None, device=None,
                   override: dict | None = None, track_higher_grads: bool = True,
                   grad_callback: Callable | None = None, allow_nonfinite: bool = False) -> "DifferentiableOptimizer":
    """The differentiable form of the existing optimizer `opt` over `reference_params` (the
    model's parameters, model.parameters() order), as higher.optim.get_diff_optim."""
    return _kind(type(opt))(opt, reference_params, fmodel=fmodel, device=device, override=override,
                            track_higher_grads=track_higher_grads, grad_callback=grad_callback,
                            allow_nonfinite=allow_nonfinite)


def create_diff_optim(opt_type: type, opt_kwargs: dict | None = None, params: Iterable | None = None, fmodel=None,
                      device=None, override: dict | None = None, track_higher_grads: bool = True,
                      grad_callback: Callable | None = None, allow_nonfinite: bool = False) -> "DifferentiableOptimizer":
    """A differentiable optimizer of a new `opt_type(params, **opt_kwargs)`, as
    higher.optim.create_diff_optim: `params` (fast weights, or parameter groups as dicts with
    'params') or `fmodel`'s weights give the shapes; the optimizer starts with no state."""
    kind = _kind(opt_type)
    if params is not None:
        params = list(params)
        if params and isinstance(params[0], dict):
            dummy = [{k: [torch.zeros_like(p, requires_grad=True) for p in v] if k == "params" else v
                      for k, v in group.items()} for group in params]
            reference = [p for group in dummy for p in group["params"]]
        else:
            dummy = reference = [torch.zeros_like(p, requires_grad=True) for p in params]
    elif fmodel is not None:
        dummy = reference = [torch.zeros_like(p, requires_grad=True) for p in fmodel.parameters()]
    else:
        raise ValueError("create_diff_optim needs params=... (the fast weights) or fmodel=... to know the weights")
    opt = opt_type(dummy, **(opt_kwargs or {}))
    return kind(opt, reference, fmodel=fmodel, device=device, override=override,
                track_higher_grads=track_higher_grads, grad_callback=grad_callback, allow_nonfinite=allow_nonfinite)


def _kind(opt_type: type) -> type:
    kinds = {torch.optim.SGD: DifferentiableSGD, torch.optim.Adam: DifferentiableAdam}
    if opt_type not in kinds:
        raise ValueError(f"meta_kernels.compat.higher supports {' and '.join(SUPPORTED_OPTIMIZERS)} as inner "
                         f"optimizers, got {opt_type.__module__}.{opt_type.__name__}; use one of those "
                         "(for a learned per-weight rate see meta_kernels.compat.learn2learn.algorithms.MetaSGD)")
    return kinds[opt_type]


class DifferentiableOptimizer:
    """The inner optimizer's update as differentiable tensor operations."""
    _kind_name = "the optimizer"

    def __init__(self, opt: torch.optim.Optimizer, reference_params: Iterable[Tensor], fmodel=None, device=None,
                 override: dict | None = None, grad_callback: Callable | None = None, track_higher_grads: bool = True,
                 allow_nonfinite: bool = False):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} takes an existing torch.optim optimizer (the inner optimizer), got "
                            f"{type(opt).__name__}")
        reference = list(reference_params)
        self._n_weights = len(reference)
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
        self._fmodel, self._track_higher_grads, self._grad_callback = fmodel, track_higher_grads, grad_callback
        self.allow_nonfinite, self.steps = allow_nonfinite, 0  # ours: a NaN / inf loss raises unless allowed
        fast = getattr(fmodel, "_fast", None)
        if fast is not None:  # the fmodel's runner may hold its wide Linear weights factored (see step)
            fast.factorable = self._factored_fast() is not None

    def _check_group(self, group: dict) -> None:
        if group.get("maximize", False):
            raise ValueError("maximize=True is not supported by the differentiable optimizers; negate the loss instead")

    def _apply_override(self, override: dict) -> None:
        if not isinstance(override, dict):
            raise TypeError(f"override must be a dict of hyperparameters, e.g. {{'lr': [0.1]}}, got {type(override).__name__}")
        known = sorted(self.param_groups[0]) if self.param_groups else []
        for key, values in override.items():
            if key not in known:
                raise ValueError(f"override: unknown hyperparameter {key!r}; {self._kind_name} has {', '.join(known)}")
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if key == "lr":  # as torch.optim refuses them: no NaN, inf, 0 or negative rate
                values = [checked_rate(v, "override", "override['lr']") for v in values]
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
        from_fmodel = params is None
        if params is None:
            if self._fmodel is None:
                raise ValueError("pass params=... to step(): this optimizer has no fmodel to take the weights from")
            params = self._fmodel._fast_params[-1]  # as held: factored weights are formed only if needed below
        params = list(params)
        if len(params) != self._n_weights:
            raise ValueError(f"diffopt.step: params holds {len(params)} tensors but the model has {self._n_weights} "
                             "weights; pass one per tensor of model.parameters(), in that order (or leave params out: "
                             "fmodel's fast weights)")
        tasks = getattr(self._fmodel, "tasks", None)
        if tasks is not None:  # the batched form: a sum over tasks of each task's loss
            loss = checked_task_loss(loss, tasks, "diffopt.step")
        check_loss(loss, "diffopt.step")
        if not loss.requires_grad:
            raise ValueError("diffopt.step: the loss does not depend on the fast weights (requires_grad is False); "
                             "compute it from fmodel's outputs, outside torch.no_grad()")
        self.steps += 1
        check_finite(loss, self.steps, "diffopt.step", self.allow_nonfinite)
        fast = self._factored_fast() if from_fmodel and grad_callback is None else None
        if fast is not None:
            return self._factored_step(fast, loss)
        params = formed(params)
        targets = [p if p.requires_grad else torch.empty(0, requires_grad=True) for p in params]
        with self._threads():
            grads = list(torch.autograd.grad(loss, targets, create_graph=self._track_higher_grads, allow_unused=True))
        if all(g is None for g in grads):
            raise ValueError("diffopt.step: the loss does not depend on the fast weights (no gradient reaches any of "
                             "them): compute it from fmodel's outputs, loss_fn(fmodel(x), y), not from the original "
                             "model's or another copy's")
        grad_callback = grad_callback if grad_callback is not None else self._grad_callback
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
            for index, new in zip(moved, sgd_update([params[i] for i in moved], directions, rates)):
                new_params[index] = new if self._track_higher_grads else new.detach().requires_grad_()
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _factored_fast(self):
        """The fmodel's FastModel where this optimizer's step is plain SGD (no momentum, no weight
        decay, no grad_callback, second order): then an SGD step adds gᵀ x to a Linear weight, and
        the fmodel's runner may hold its wide Linear weights as FactoredWeights (see
        meta_kernels.compat._common). Else None."""
        fast = getattr(self._fmodel, "_fast", None)
        plain_sgd = type(self) is DifferentiableSGD and all(
            g["momentum"] == 0 and g["weight_decay"] == 0 for g in self.param_groups)
        if fast is None or getattr(self._fmodel, "tasks", None) is not None or not plain_sgd \
                or self._grad_callback is not None or not self._track_higher_grads:
            return None
        return fast

    def _factored_step(self, fast, loss: Tensor) -> "FastWeights":
        """step() on the fmodel's own weights, which may be factored: w - lr * dloss/dw per group."""
        entries = fast.entries
        rate_of = {i: group["lr"] for group, indices in zip(self.param_groups, self._group_indices) for i in indices}
        index = [i for i in rate_of if entries[i].requires_grad]
        with self._threads():
            direct, outer = entry_grads(entries, index, fast.records, loss, True)
        if not direct and not outer:
            raise ValueError("diffopt.step: the loss does not depend on the fast weights (no gradient reaches any of "
                             "them): compute it from fmodel's outputs, loss_fn(fmodel(x), y), not from the original "
                             "model's or another copy's")
        new = stepped_entries(entries, direct, outer, lambda i, g: g, [rate_of.get(i, 0.0) for i in range(len(entries))])
        self._fmodel._set_entries(new)
        return FastWeights(new)

    def _threads(self):
        """The thread count the fmodel's runner chose for its inner work (see ModelRunner)."""
        fast = getattr(self._fmodel, "_fast", None)
        if fast is None or getattr(self._fmodel, "tasks", None) is not None:
            return contextlib.nullcontext()
        return fast.runner.threads(self._track_higher_grads)

    def _direction(self, group: dict, state: dict, p: Tensor, g: Tensor) -> tuple[Tensor, float | Tensor]:
        """(d, rate) of the update p - rate * d."""
        raise NotImplementedError


class DifferentiableSGD(DifferentiableOptimizer):
    """torch.optim.SGD: weight decay, momentum with dampening, nesterov."""
    _kind_name = "torch.optim.SGD"

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
    _kind_name = "torch.optim.Adam"

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
        # As torch.optim.Adam: eps is added to the bias-corrected root of the second moment,
        # sqrt(v) / sqrt(1 - beta2^t) + eps, and the step is lr / (1 - beta1^t).
        denom = second.sqrt() / math.sqrt(1 - beta2 ** state["step"]) + group["eps"]
        rate = group["lr"] / (1 - beta1 ** state["step"])
        return exp_avg / denom, rate


class FastWeights(Sequence):
    """What step() returns after a factored step: the new fast weights, each formed when read
    (reading them all, as fmodel.fast_params does, makes the fmodel run on the formed weights)."""

    def __init__(self, entries: list):
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i):
        return formed(self._entries[i]) if isinstance(i, slice) else formed([self._entries[i]])[0]


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
