"""MAML and MetaSGD with learn2learn 0.2's semantics.

As in learn2learn:
- `clone()` gives a learner whose weights are differentiable clones of the original's, so the
  meta-gradient of a loss computed with an adapted clone reaches the original weights; a weight
  shared by several modules stays shared.
- Buffers are not copied: BatchNorm's running statistics of a clone are the original's tensors,
  so training-mode forwards of clones update the original's statistics.
- `adapt(loss)` replaces the learner's weights by w - lr * dloss/dw, second order unless
  `first_order`; the learner changes in place.

What is faster: a clone is a list of weights, not a copy of the module tree; the model's own
modules run with those weights swapped in, or on the fused ops, and a MAML learner's wide Linear
weights are stepped in factored form, where that measured faster for the model
(meta_kernels.compat._common.ModelRunner, FactoredWeight); an update is one multi-tensor call.
`learner.module` and the model's attributes (`learner.features`) are still there: the first access
copies the tree.

What differs: errors where learn2learn printed a traceback and failed later (a frozen weight
without `allow_nograd`, an unused weight without `allow_unused`, a stale or non-scalar loss), and
the batched form: `MAML(..., tasks=T)` or `clone(tasks=T)` returns a BatchedLearner for T tasks.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from meta_kernels.compat._common import (FastModel, check_finite, check_loss, checked_rate, checked_tasks, clone_tree,
                                         engine_factorable, runner_for, stepped_entries, task_model_for)
from meta_kernels.compat._tasks import checked_task_loss, inputs_tasks_first, task_outputs
from meta_kernels.meta.factored import FactoredWeight, entry_grads, formed, placeholder
from meta_kernels.meta.inner_common import check_rates, checked_flag


def clone_module(module: nn.Module, memo=None) -> nn.Module:
    """learn2learn's clone_module: the module tree with differentiable clones of its weights and
    the same buffers (a buffer that requires grad is cloned too)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"clone_module takes an nn.Module, got {type(module).__name__}")
    return clone_tree(module, weight=lambda p: p.clone(), buffer=lambda b: b.clone() if b.requires_grad else b, memo=memo)


class BaseLearner(nn.Module):
    """A wrapper whose unknown attributes are those of the wrapped module, as in learn2learn. A
    wrapper holds the model as a submodule (its optimiser sees the model's weights); a clone holds
    a FastModel: the model and this learner's weights."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} wraps an nn.Module, got {type(module).__name__}; pass the model "
                            f"(e.g. {type(self).__name__}(model, lr=0.5))")
        self.module = module

    @property
    def module(self) -> nn.Module:
        fast = self.__dict__.get("_fast")
        return self._modules["module"] if fast is None else fast.tree()

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if attr.startswith("__") or "_modules" not in self.__dict__:
                raise
            return getattr(self.module, attr)

    def forward(self, *args, **kwargs):
        fast = self.__dict__.get("_fast")
        second_order = not self.__dict__.get("first_order", False)
        if fast is None:
            return runner_for(self._modules["module"])(None, None, args, kwargs, second_order)
        return fast(args, kwargs, second_order)

    # A clone's weights are its own list, not registered parameters.
    def parameters(self, recurse: bool = True):
        fast = self.__dict__.get("_fast")
        return super().parameters(recurse) if fast is None else iter(fast.weights)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        fast = self.__dict__.get("_fast")
        if fast is None:
            return super().named_parameters(prefix, recurse, remove_duplicate)
        pre = f"{prefix}.module." if prefix else "module."
        return iter([(pre + name, w) for name, w in zip(fast.runner.slots.param_names, fast.weights)])

    def train(self, mode: bool = True):
        fast = self.__dict__.get("_fast")
        if fast is not None:
            fast.tree().train(mode)
            self.training = mode
            return self
        return super().train(mode)

    def _base_model(self) -> nn.Module:
        fast = self.__dict__.get("_fast")
        return self._modules["module"] if fast is None else fast.runner.model

    def _weights(self, factored: bool = False) -> list:
        """The weights as tensors (factored: as the learner holds them, FactoredWeights kept)."""
        fast = self.__dict__.get("_fast")
        if fast is None:
            return list(runner_for(self._modules["module"]).slots.params)
        return list(fast.entries) if factored else fast.weights

    def _clone_with(self, weights: list, factorable: bool = False, **attrs) -> "BaseLearner":
        clone = type(self).__new__(type(self))
        nn.Module.__init__(clone)
        clone.__dict__.update(attrs, _fast=FastModel(runner_for(self._base_model()), weights, factorable=factorable))
        return clone


class MAML(BaseLearner):
    """learn2learn.algorithms.MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False).

    allow_nograd: weights with requires_grad=False are left as they are (otherwise adapting a
    model with one raises); allow_unused (defaults to allow_nograd): weights the loss does not
    depend on are left as they are (otherwise that raises). Ours: tasks=T makes every clone() a
    BatchedLearner for T tasks at once, their inputs holding the tasks in dim `task_dim`; a NaN /
    inf inner loss raises NonFiniteLossError naming the step unless allow_nonfinite=True."""

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False, *, tasks: int | None = None, task_dim: int = 0,
                 allow_nonfinite: bool = False):
        super().__init__(model)
        self.lr = checked_rate(lr, "MAML", "lr")
        self.first_order = checked_flag(first_order, "MAML: first_order")
        self.allow_nograd = checked_flag(allow_nograd, "MAML: allow_nograd")
        self.allow_unused = self.allow_nograd if allow_unused is None else checked_flag(allow_unused, "MAML: allow_unused")
        self.tasks, self.task_dim = checked_tasks(tasks, task_dim)
        self.allow_nonfinite = allow_nonfinite

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One gradient step on `loss`, in place: every adapted weight w becomes w - lr * dloss/dw."""
        first_order, allow_unused, allow_nograd = self._options(first_order, allow_unused, allow_nograd)
        fast = self._adaptable_fast()
        _step(self, fast, loss, lambda i, g: g, [self.lr] * len(fast.entries), not first_order, allow_unused,
              allow_nograd)

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None, *, tasks: int | None = None, task_dim: int | None = None):
        """A learner to adapt: a copy whose weights are differentiable clones of these. With
        tasks=T (here or given to MAML), a BatchedLearner holding T such clones at once."""
        first_order, allow_unused, allow_nograd = self._options(first_order, allow_unused, allow_nograd)
        tasks, task_dim = checked_tasks(self.tasks if tasks is None else tasks,
                                        self.task_dim if task_dim is None else task_dim)
        if tasks is not None:
            return BatchedLearner(self._base_model(), tasks, self.lr, task_dim=task_dim, first_order=first_order,
                                  allow_unused=allow_unused, allow_nograd=allow_nograd,
                                  allow_nonfinite=self.allow_nonfinite,
                                  weights=None if "_fast" not in self.__dict__ else self._weights())
        return self._clone_with(self._weights(factored=True), True, lr=self.lr, first_order=first_order,
                                allow_unused=allow_unused,
                                allow_nograd=allow_nograd, tasks=None, task_dim=0, allow_nonfinite=self.allow_nonfinite,
                                _steps=self.__dict__.get("_steps", 0))

    def _options(self, first_order, allow_unused, allow_nograd):
        return (self.first_order if first_order is None else checked_flag(first_order, "first_order"),
                self.allow_unused if allow_unused is None else checked_flag(allow_unused, "allow_unused"),
                self.allow_nograd if allow_nograd is None else checked_flag(allow_nograd, "allow_nograd"))

    def _adaptable_fast(self) -> FastModel:
        fast = self.__dict__.get("_fast")
        if fast is None:
            raise RuntimeError(f"adapt() on the {type(self).__name__} wrapper itself would overwrite the model's "
                               f"weights; adapt a clone: learner = {type(self).__name__.lower()}.clone(); "
                               "learner.adapt(loss)")
        return fast


class MetaSGD(BaseLearner):
    """learn2learn.algorithms.MetaSGD(model, lr=1.0, first_order=False, lrs=None): MAML with a
    learned rate for every element of every weight (`lrs`, initialised to `lr`), updated by the
    outer optimiser with the model: w becomes w - lrs_w * dloss/dw. tasks / task_dim as in MAML."""

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None, *,
                 tasks: int | None = None, task_dim: int = 0, allow_nonfinite: bool = False):
        super().__init__(model)
        params = list(model.parameters())
        if lrs is None:
            lr = checked_rate(lr, "MetaSGD", "lr")
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in params])
        else:
            lrs = _checked_rates(lrs, model)
        self.lrs = lrs
        self.first_order = checked_flag(first_order, "MetaSGD: first_order")
        self.tasks, self.task_dim = checked_tasks(tasks, task_dim)
        self.allow_nonfinite = allow_nonfinite

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        first_order = self.first_order if first_order is None else checked_flag(first_order, "first_order")
        fast = self.__dict__.get("_fast")
        if fast is None:
            raise RuntimeError("adapt() on the MetaSGD wrapper itself would overwrite the model's weights; adapt a "
                               "clone: learner = meta_sgd.clone(); learner.adapt(loss)")
        rates = list(self.lrs)
        _step(self, fast, loss, lambda i, g: rates[i] * g, [1.0] * len(fast.entries), not first_order, False, False)

    def clone(self, *, tasks: int | None = None, task_dim: int | None = None):
        """A learner whose weights and rates are differentiable clones of these (rates stay shared
        with the meta-gradient flowing to them). With tasks=T, a BatchedLearner of T clones."""
        tasks, task_dim = checked_tasks(self.tasks if tasks is None else tasks,
                                        self.task_dim if task_dim is None else task_dim)
        if tasks is not None:
            return BatchedLearner(self._base_model(), tasks, 1.0, task_dim=task_dim, first_order=self.first_order,
                                  rates=list(self.lrs), allow_nonfinite=self.allow_nonfinite,
                                  weights=None if "_fast" not in self.__dict__ else self._weights())
        return self._clone_with(self._weights(), lrs=list(self.lrs), first_order=self.first_order, tasks=None,
                                task_dim=0, allow_nonfinite=self.allow_nonfinite, _steps=self.__dict__.get("_steps", 0))


class BatchedLearner:
    """T clones of a model adapted at once: `MAML(model, lr, tasks=T)` then `clone()`, or
    `maml.clone(tasks=T)`.

    Every weight carries a task dim ([T, *shape]). Inputs hold the tasks in dim `task_dim` ([T, N,
    ...] or [N, T, ...]); the model's own forward runs for all tasks at once on the task-batching
    engine (meta_kernels.meta.batching: convs, linears and norms task-aware, BatchNorm statistics
    per task, running statistics updated as the per-task loop would, task after task). Outputs
    are TaskOutputs in the K-dimensional loss layout ([T, C, N] or [N, C, T]; see
    meta_kernels.compat._tasks), so torch's loss functions return the sum over tasks of each task's
    loss and `argmax(dim=1)` gives each sample's class. `adapt(loss)` updates each task's weights
    with that task's gradient; the meta-gradient of such a sum equals the sum of the per-task
    meta-gradients of T separate clones.

    Train / eval mode follows the original model; `module` is the original model."""

    def __init__(self, model: nn.Module, tasks: int, lr, *, task_dim: int = 0, first_order: bool = False,
                 allow_unused: bool = False, allow_nograd: bool = False, rates: list[Tensor] | None = None,
                 weights: list[Tensor] | None = None, allow_nonfinite: bool = False):
        tasks, task_dim = checked_tasks(tasks, task_dim)
        self.allow_nonfinite, self._steps = allow_nonfinite, 0
        self.module, self.tasks, self.task_dim, self.lr = model, tasks, task_dim, lr
        self.first_order, self.allow_unused, self.allow_nograd = first_order, allow_unused, allow_nograd
        self.rates = rates  # MetaSGD: one rate tensor per weight, shared by the tasks
        self._engine = task_model_for(model)
        self._names = [name for name, _ in model.named_parameters()]
        base = list(model.parameters()) if weights is None else weights
        self._weights = [w if isinstance(w, FactoredWeight) or w.dim() > p.dim() else
                         w.unsqueeze(0).expand(tasks, *w.shape) for w, p in zip(base, model.parameters())]
        self._records: list = []  # the factored forwards since the last step
        if rates is None:  # MAML: wide Linear weights stepped in factored form (not MetaSGD's per-element rates)
            for i in engine_factorable(model, self._engine):
                if isinstance(self._weights[i], Tensor) and self._weights[i].requires_grad:
                    self._weights[i] = FactoredWeight(self._weights[i])

    def __call__(self, *args, **kwargs):
        inputs = args[0] if len(args) == 1 and not kwargs else (args, kwargs)
        inputs = inputs_tasks_first(inputs, self.task_dim, self.tasks, "this learner")
        weights = [placeholder(i, w, self._records) if isinstance(w, FactoredWeight) else w
                   for i, w in enumerate(self._weights)]
        out = self._engine(dict(zip(self._names, weights)), inputs,
                           double_backward=not self.first_order and torch.is_grad_enabled())
        return task_outputs(out, self.task_dim)

    def parameters(self):
        return iter(formed(self._weights))

    def named_parameters(self):
        return iter(zip(self._names, formed(self._weights)))

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One step for every task: `loss` is the sum over tasks of each task's loss (a torch loss
        function or task_sum(loss_fn) on this learner's outputs), or the [T] vector of them."""
        first_order = self.first_order if first_order is None else checked_flag(first_order, "first_order")
        allow_unused = self.allow_unused if allow_unused is None else checked_flag(allow_unused, "allow_unused")
        allow_nograd = self.allow_nograd if allow_nograd is None else checked_flag(allow_nograd, "allow_nograd")
        loss = checked_task_loss(loss, self.tasks, "adapt")
        rates = self.rates
        direction = (lambda i, g: g) if rates is None else (lambda i, g: rates[i] * g)
        self._weights = _updated(self, self._names, self._weights, loss, direction, [self.lr] * len(self._weights),
                                 not first_order, allow_unused, allow_nograd, self._records)
        self._records = []

    def clone(self) -> "BatchedLearner":
        clone = BatchedLearner(self.module, self.tasks, self.lr, task_dim=self.task_dim, first_order=self.first_order,
                               allow_unused=self.allow_unused, allow_nograd=self.allow_nograd, rates=self.rates,
                               weights=list(self._weights), allow_nonfinite=self.allow_nonfinite)
        clone._steps = self._steps
        return clone


# ---- the step shared by the learners -------------------------------------------------------------

def _step(learner: BaseLearner, fast: FastModel, loss, direction, rates, second_order, allow_unused, allow_nograd):
    check_loss(loss, "adapt")
    with fast.runner.threads(second_order):
        entries = _updated(learner, fast.runner.slots.param_names, fast.entries, loss, direction, rates, second_order,
                           allow_unused, allow_nograd, fast.records)
    fast.set_weights(entries)


def _updated(learner, names: list[str], weights: list, loss: Tensor, direction, rates, second_order: bool,
             allow_unused: bool, allow_nograd: bool, records=()) -> list:
    """The weights after one step: w_i - rates[i] * direction(i, dloss/dw_i) for the adapted ones
    (tensors, or FactoredWeights with the factored forwards `records` since the last step)."""
    frozen = [name for name, w in zip(names, weights) if not w.requires_grad]
    if frozen and not allow_nograd:
        raise ValueError(f"cannot adapt {', '.join(frozen)}: requires_grad is False; pass allow_nograd=True "
                         f"(to MAML(...), clone() or adapt()) to leave frozen weights as they are")
    index = [i for i, w in enumerate(weights) if w.requires_grad]
    if not index:
        raise ValueError("no weight of this learner requires grad, so adapt() has nothing to change; unfreeze the "
                         "weights to adapt (requires_grad_(True))")
    last = learner.__dict__.get("_last_loss")
    if last is not None and last() is loss:
        raise ValueError("this loss was already used by adapt(): the learner's weights have changed since, so it does "
                         "not depend on them; compute the loss again from learner(x) before each adapt()")
    if not loss.requires_grad:
        raise ValueError("the loss passed to adapt() does not depend on the learner's weights (requires_grad is "
                         "False): compute it from the learner's outputs, outside torch.no_grad()")
    step = learner.__dict__.get("_steps", 0) + 1
    check_finite(loss, step, "adapt", learner.__dict__.get("allow_nonfinite", False))
    direct, outer = entry_grads(weights, index, records, loss, second_order)
    unused = [names[i] for i in index if i not in direct and i not in outer]
    if len(unused) == len(index):
        raise ValueError("the loss does not depend on any of the learner's current weights: was it computed before "
                         "the last adapt(), or from another learner? compute it from this learner's outputs")
    if unused and not allow_unused:
        raise ValueError(f"the loss does not depend on {', '.join(unused)}; pass allow_unused=True (to MAML(...), "
                         f"clone() or adapt()) to leave such weights as they are")
    out = stepped_entries(weights, direct, outer, direction, rates)
    learner.__dict__["_last_loss"] = weakref.ref(loss)
    learner.__dict__["_steps"] = step
    return out


def _checked_rates(lrs, model: nn.Module):
    rates, params = list(lrs), list(model.named_parameters())
    if len(rates) != len(params):
        raise ValueError(f"MetaSGD: lrs holds {len(rates)} tensors but the model has {len(params)} weights; give one "
                         "rate tensor per weight, in model.parameters() order")
    for rate, (name, p) in zip(rates, params):
        if not isinstance(rate, Tensor) or rate.shape != p.shape:
            shape = list(rate.shape) if isinstance(rate, Tensor) else type(rate).__name__
            raise ValueError(f"MetaSGD: the rate for {name} has shape {shape}, but the weight has {list(p.shape)}; "
                             "each rate tensor must have its weight's shape")
        # Finite; below zero is allowed: learned rates may cross zero (Meta-SGD learns their sign).
        check_rates(rate, f"MetaSGD: the rate for {name}", allow_negative=True)
    return lrs
