"""MAML and MetaSGD with learn2learn 0.2's semantics, updates on the fused `sgd_step`.

As in learn2learn:
- `clone()` copies the module tree; its weights are differentiable clones of the original's, so
  the meta-gradient of a loss computed with an adapted clone reaches the original weights. A
  weight shared by several modules stays shared in the clone.
- Buffers are not copied: BatchNorm's running statistics of a clone are the original's tensors,
  so training-mode forwards of clones update the original's statistics.
- `adapt(loss)` replaces the learner's weights by w - lr * dloss/dw, second order unless
  `first_order`; the learner changes in place.

What differs: errors are raised where learn2learn printed a traceback and failed later (a frozen
weight without `allow_nograd`, an unused weight without `allow_unused`), and `clone(tasks=T)`
returns the batched form (BatchedLearner).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from meta_kernels.compat._common import OneTaskRunner, clone_tree, fused_sgd, replace_weights
from meta_kernels.meta.inner_common import lead_tensor
from meta_kernels.meta.task_model import TaskModel


def clone_module(module: nn.Module) -> nn.Module:
    """learn2learn's clone_module: the module tree with differentiable clones of its weights and
    the same buffers (a buffer that requires grad is cloned too)."""
    return clone_tree(module, weight=lambda p: p.clone(), buffer=lambda b: b.clone() if b.requires_grad else b)


class BaseLearner(nn.Module):
    """A wrapper whose unknown attributes are those of the wrapped module, as in learn2learn. Its
    forward is the module's, on the fused ops where the model allows (OneTaskRunner)."""

    def __init__(self, module: nn.Module | None = None):
        super().__init__()
        self.module = module

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], attr)

    def forward(self, *args, **kwargs):
        runner = self.__dict__.get("_runner")
        if runner is None or runner.module is not self.module:
            runner = self.__dict__["_runner"] = OneTaskRunner(self.module)
        return runner(args, kwargs)


class MAML(BaseLearner):
    """learn2learn.algorithms.MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False).

    allow_nograd: weights with requires_grad=False are left as they are (otherwise adapting a
    model with one raises); allow_unused (defaults to allow_nograd): weights the loss does not
    depend on are left as they are (otherwise that raises)."""

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False):
        super().__init__(model)
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One gradient step on `loss`, in place: every adapted weight w becomes w - lr * dloss/dw."""
        first_order, allow_unused, allow_nograd = self._options(first_order, allow_unused, allow_nograd)
        params = _adaptable(self.module.named_parameters(), allow_nograd)
        grads = _gradients(loss, params, second_order=not first_order, allow_unused=allow_unused)
        moved = [(p, g) for (_, p), g in zip(params, grads) if g is not None]
        if not moved:
            return
        new = fused_sgd([p for p, _ in moved], [g for _, g in moved], [self.lr] * len(moved))
        replace_weights(self.module, {id(p): n for (p, _), n in zip(moved, new)})

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None, *, tasks: int | None = None):
        """A learner to adapt: a copy whose weights are differentiable clones of these. With
        `tasks=T`, a BatchedLearner holding T such clones at once."""
        first_order, allow_unused, allow_nograd = self._options(first_order, allow_unused, allow_nograd)
        if tasks is not None:
            return BatchedLearner(self.module, tasks, self.lr, first_order=first_order, allow_unused=allow_unused,
                                  allow_nograd=allow_nograd)
        return MAML(clone_module(self.module), lr=self.lr, first_order=first_order, allow_unused=allow_unused,
                    allow_nograd=allow_nograd)

    def _options(self, first_order, allow_unused, allow_nograd):
        return (self.first_order if first_order is None else first_order,
                self.allow_unused if allow_unused is None else allow_unused,
                self.allow_nograd if allow_nograd is None else allow_nograd)


class MetaSGD(BaseLearner):
    """learn2learn.algorithms.MetaSGD(model, lr=1.0, first_order=False, lrs=None): MAML with a
    learned rate for every element of every weight (`lrs`, initialised to `lr`), updated by the
    outer optimiser with the model: w becomes w - lrs_w * dloss/dw."""

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None):
        super().__init__(model)
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        self.lrs = lrs
        self.first_order = first_order

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        first_order = self.first_order if first_order is None else first_order
        params = _adaptable(self.module.named_parameters(), allow_nograd=False)
        grads = _gradients(loss, params, second_order=not first_order, allow_unused=False)
        steps = [rate * g for rate, g in zip(self.lrs, grads)]
        new = fused_sgd([p for _, p in params], steps, [1.0] * len(params))
        replace_weights(self.module, {id(p): n for (_, p), n in zip(params, new)})

    def clone(self, *, tasks: int | None = None):
        """A learner whose weights and rates are differentiable clones of these (rates stay shared
        with the meta-gradient flowing to them). With `tasks=T`, a BatchedLearner of T clones."""
        if tasks is not None:
            return BatchedLearner(self.module, tasks, 1.0, first_order=self.first_order, rates=list(self.lrs))
        return MetaSGD(clone_module(self.module), lrs=[rate.clone() for rate in self.lrs], first_order=self.first_order)


class BatchedLearner:
    """T clones of a model adapted at once: `maml.clone(tasks=T)`.

    Every weight carries a task dim ([T, *shape]); the learner takes inputs [T, N, ...] and
    returns outputs [T, N, ...], running the model's own forward for all tasks on the
    task-batching engine (meta_kernels.meta.batching: convs, linears and norms task-aware, BatchNorm
    statistics per task). `adapt(loss)` takes the sum of the per-task losses (`task_sum(loss_fn)`
    makes a loss function give it) and updates each task's weights with that task's gradient, in
    one fused `sgd_step` launch. The meta-gradient of a query loss summed over tasks equals the sum
    of the per-task meta-gradients of T separate clones; divide it by T for learn2learn's mean.

    Train / eval mode follows the original model; `module` is the original model."""

    def __init__(self, model: nn.Module, tasks: int, lr, *, first_order: bool = False, allow_unused: bool = False,
                 allow_nograd: bool = False, rates: list[Tensor] | None = None, weights: dict[str, Tensor] | None = None):
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
            raise ValueError(f"tasks must be a positive int (the number of tasks adapted at once), got {tasks!r}")
        self.module, self.tasks, self.lr = model, tasks, lr
        self.first_order, self.allow_unused, self.allow_nograd = first_order, allow_unused, allow_nograd
        self.rates = rates  # MetaSGD: one rate tensor per weight, shared by the tasks
        self._engine = TaskModel(model)
        if weights is None:
            weights = {name: p.unsqueeze(0).expand(tasks, *p.shape) for name, p in model.named_parameters()}
        self._weights = weights

    def __call__(self, *args, **kwargs):
        inputs = args[0] if len(args) == 1 and not kwargs else (args, kwargs)
        T = lead_tensor(inputs).shape[0]
        if T != self.tasks:
            raise ValueError(f"this learner adapts {self.tasks} tasks at once, but the inputs hold {T} in dim 0; "
                             f"pass inputs as [{self.tasks}, N, ...] (or clone with tasks={T})")
        return self._engine(self._weights, inputs, double_backward=not self.first_order and torch.is_grad_enabled())

    def parameters(self):
        return iter(self._weights.values())

    def named_parameters(self):
        return iter(self._weights.items())

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One step for every task: `loss` is the sum over tasks of each task's loss (or the [T]
        vector of them, summed here)."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        if loss.dim() == 1 and loss.numel() == self.tasks:
            loss = loss.sum()
        if loss.dim() != 0:
            raise ValueError(f"adapt takes the sum of the {self.tasks} per-task losses (a scalar) or their [T] vector, "
                             f"got a loss of shape {list(loss.shape)}; meta_kernels.compat.task_sum(loss_fn) gives the sum")
        params = _adaptable(self._weights.items(), allow_nograd)
        grads = _gradients(loss, params, second_order=not first_order, allow_unused=allow_unused)
        rates = dict(zip(self._weights, self.rates)) if self.rates is not None else {}
        moved = [(name, p, g * rates[name] if rates else g) for (name, p), g in zip(params, grads) if g is not None]
        if not moved:
            return
        new = fused_sgd([p for _, p, _ in moved], [d for _, _, d in moved], [self.lr] * len(moved))
        self._weights = {**self._weights, **{name: n for (name, _, _), n in zip(moved, new)}}

    def clone(self) -> "BatchedLearner":
        return BatchedLearner(self.module, self.tasks, self.lr, first_order=self.first_order,
                              allow_unused=self.allow_unused, allow_nograd=self.allow_nograd, rates=self.rates,
                              weights={k: v.clone() for k, v in self._weights.items()})


def _adaptable(named, allow_nograd: bool) -> list[tuple[str, Tensor]]:
    named = list(named)
    frozen = [name for name, p in named if not p.requires_grad]
    if frozen and not allow_nograd:
        raise ValueError(f"cannot adapt {', '.join(frozen)}: requires_grad is False; pass allow_nograd=True "
                         f"(to MAML(...), clone() or adapt()) to leave frozen weights as they are")
    return [(name, p) for name, p in named if p.requires_grad]


def _gradients(loss: Tensor, params: list[tuple[str, Tensor]], *, second_order: bool, allow_unused: bool):
    if not loss.requires_grad:
        raise ValueError("the loss passed to adapt() does not depend on the learner's weights (requires_grad is "
                         "False): compute it from the learner's outputs, outside torch.no_grad()")
    grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=second_order, create_graph=second_order,
                                allow_unused=True)
    unused = [name for (name, _), g in zip(params, grads) if g is None]
    if unused and not allow_unused:
        raise ValueError(f"the loss does not depend on {', '.join(unused)}; pass allow_unused=True (to MAML(...), "
                         f"clone() or adapt()) to leave such weights as they are")
    return grads
