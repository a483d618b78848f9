"""higher.patch.monkeypatch: the model with fast weights (FunctionalModule)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from meta_kernels.compat._common import FastModel, checked_tasks, runner_for, task_model_for
from meta_kernels.compat._tasks import inputs_tasks_first, task_outputs
from meta_kernels.meta.factored import formed


def monkeypatch(module: nn.Module, device=None, copy_initial_weights: bool = True, track_higher_grads: bool = True,
                *, tasks: int | None = None, task_dim: int = 0) -> "FunctionalModule":
    """The model with fast weights, as higher.monkeypatch: calls take `params=` (a list of
    tensors, one per weight); its buffers are copies. tasks=T (ours): the batched form, see
    innerloop_ctx."""
    return FunctionalModule(module, device, copy_initial_weights, track_higher_grads, tasks, task_dim)


class FunctionalModule(nn.Module):
    """The model run with fast weights and its own copies of the buffers; attributes not found
    here are the model's (fmodel.fc, fmodel.conv...: the first access copies the module tree).

    As in higher 0.2: `fmodel(x)` runs with the latest fast weights, `fmodel(x, params=[...])` with
    (and from then on) the ones given, `fmodel.parameters(time=k)` returns those after k updates
    (only the latest and the initial ones without track_higher_grads), `fast_params` the latest,
    `update_params(params)` sets them."""

    def __init__(self, model: nn.Module, device=None, copy_initial_weights: bool = True, track_higher_grads: bool = True,
                 tasks: int | None = None, task_dim: int = 0):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"higher.monkeypatch / innerloop_ctx take an nn.Module, got {type(model).__name__}; pass "
                            "the model whose weights the inner loop adapts")
        tasks, task_dim = checked_tasks(tasks, task_dim)
        move = (lambda t: t) if device is None else (lambda t: t.to(device))
        runner = runner_for(model)
        originals = runner.slots.params
        if copy_initial_weights:
            initial = [move(p.detach().clone()).requires_grad_(p.requires_grad) for p in originals]
        else:
            initial = [move(p.clone()) for p in originals]
        buffers = [move(b.detach().clone()) for b in runner.slots.buffers]
        d = self.__dict__
        d["track_higher_grads"], d["tasks"], d["task_dim"] = track_higher_grads, tasks, task_dim
        d["_fast"] = FastModel(runner, initial, buffers)
        d["_fast_params"] = []
        if tasks is not None:
            d["_engine"] = task_model_for(model)
            d["_names"] = runner.slots.param_names
            initial = [p.unsqueeze(0).expand(tasks, *p.shape) for p in initial]
        self.update_params(initial)

    @property
    def module(self) -> nn.Module:
        return self._fast.tree()

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if attr.startswith("__") or "_fast" not in self.__dict__:
                raise
            return getattr(self._fast.tree(), attr)

    @property
    def fast_params(self) -> list[Tensor]:
        return formed(self._fast_params[-1])

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        self.update_params(value)

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Makes `params` (one tensor per weight, in model.parameters() order) the fast weights."""
        params = list(params)
        n = len(self._fast.runner.slots.params)
        if len(params) != n:
            raise ValueError(f"params holds {len(params)} tensors but the model has {n} weights; pass one per tensor of "
                             "model.parameters(), in that order")
        names, originals = self._fast.runner.slots.param_names, self._fast.runner.slots.params
        for i, (p, own) in enumerate(zip(params, originals)):
            shape = list(p.shape) if isinstance(p, Tensor) else None
            if shape is None or (shape != list(own.shape) and shape[1:] != list(own.shape)):
                got = f"shape {shape}" if shape is not None else type(p).__name__
                raise ValueError(f"params[{i}] has {got}, but the weight {names[i]} has {list(own.shape)}; pass the "
                                 "tensors of model.parameters() (or the fast weights), in that order")
        self._set_entries(params)

    def _set_entries(self, entries: list) -> None:
        """The fast weights after an update: tensors, or (DifferentiableSGD's factored steps)
        FactoredWeights, formed when read (fast_params, parameters())."""
        if self.tasks is None:  # the batched form passes its weights to the engine at each call
            self._fast.set_weights(entries)
        if self.track_higher_grads or not self._fast_params:
            self._fast_params.append(entries)
        else:
            self._fast_params[0] = entries

    def forward(self, *args, params: Iterable[Tensor] | None = None, **kwargs):
        if params is not None:
            self.update_params(params)
        second_order = self.track_higher_grads
        if self.tasks is None:
            return self._fast(args, kwargs, second_order)
        inputs = args[0] if len(args) == 1 and not kwargs else (args, kwargs)
        inputs = inputs_tasks_first(inputs, self.task_dim, self.tasks, "this fmodel")
        weights = dict(zip(self._names, self.fast_params))
        run = lambda: self._engine(weights, inputs, double_backward=second_order and torch.is_grad_enabled())
        return task_outputs(self._fast.runner.slots.call_with(None, self._fast.buffers, run), self.task_dim)

    def parameters(self, recurse: bool = True, time: int | None = None):
        time = -1 if time is None else time
        if not self.track_higher_grads and time not in (-1, 0):
            raise ValueError("this fmodel does not track higher grads (track_higher_grads=False): only the latest "
                             "weights are kept; call parameters() or parameters(time=0)")
        held = len(self._fast_params)
        if isinstance(time, bool) or not isinstance(time, int) or not -held <= time < held:
            raise ValueError(f"time={time!r}, but fmodel holds the weights of times 0..{held - 1} (0: the initial ones, "
                             f"{held - 1}: after the last of its {held - 1} update(s)); -1 is the latest")
        return iter(formed(self._fast_params[time]))

    def train(self, mode: bool = True):
        if self.tasks is None:
            self._fast.tree().train(mode)
        self.training = mode
        return self


__all__ = ["FunctionalModule", "monkeypatch"]
