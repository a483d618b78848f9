"""A small wrapper for users who bring their own model, in the spirit of
learn2learn.algorithms.MAML:

    maml = MAML(model, lr=0.4, first_order=False)
    adapted = maml.adapt(x_support, y_support, steps=5)   # one task, or [T, ...] for T tasks
    loss = F.cross_entropy(maml(x_query, adapted), y_query)
    loss.backward()                                         # meta-gradient on model.parameters()
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from meta_kernels.meta.inner import _check_params_of, adapt
from meta_kernels.meta.inner_common import check_tensors, checked_clip, checked_flag, compute_inputs, lead_tensor
from meta_kernels.meta.task_model import TaskModel
from meta_kernels.tensor_utils import compute_dtype


class MAML(nn.Module):
    def __init__(self, model: nn.Module, lr: float, first_order: bool = False, *, inner_clip: float | None = None,
                 engine: str = "custom", loss="cross_entropy", task_batching: str = "auto", adapt_params=None):
        """loss: 'cross_entropy', 'mse' or a callable loss_fn(outputs, targets) -> scalar;
        adapt_params: names or a predicate(name, tensor) of the parameters to adapt (default: every
        one that requires grad)."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAML wraps an nn.Module, got {type(model).__name__}; pass your model: MAML(model, lr=0.4)")
        # A 0-d tensor is one rate, checked as a number is (it may be learned: it keeps its graph).
        value = float(lr.detach()) if isinstance(lr, Tensor) and lr.dim() == 0 and lr.is_floating_point() else lr
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)) or \
                (not isinstance(value, Tensor) and not 0 < value < math.inf):
            raise ValueError(f"MAML: lr must be a finite number > 0 (the inner learning rate, e.g. lr=0.4), a per-"
                             f"parameter tensor or a per-step table, got {lr!r}")
        self.module = model
        self.lr, self.inner_clip, self.engine, self.loss = lr, checked_clip(inner_clip, "MAML: inner_clip"), engine, loss
        self.first_order = checked_flag(first_order, "MAML: first_order")
        self.adapt_params = adapt_params
        self.task_model = TaskModel(model, task_batching)

    def adapt(self, x: Tensor, y: Tensor, steps: int = 1) -> dict[str, Tensor]:
        """Adapted weights; a single task (y [N]) gives unbatched weights, T tasks give [T, ...]."""
        check_tensors(x, y, "MAML.adapt")
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.module.parameters()):
            raise ValueError(f"MAML.adapt: no parameter of {type(self.module).__name__} requires grad, so there is "
                             "nothing to adapt or meta-train; unfreeze them (p.requires_grad_(True)), or adapt under "
                             "torch.no_grad() to evaluate")
        single = self.loss == "cross_entropy" and y.dim() == 1
        adapted, self.inner_logs = adapt(dict(self.module.named_parameters()), (x, y), model=self.task_model,
                                         steps=steps, lrs=self.lr, first_order=self.first_order,
                                         inner_clip=self.inner_clip, engine=self.engine, loss=self.loss,
                                         adapt_params=self.adapt_params)
        return {k: v[0] for k, v in adapted.items()} if single else adapted

    def forward(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """The model under `params` (adapted weights) or its own weights when None. Under adapted
        weights, half-precision inputs are converted as in `adapt`'s inner loop."""
        if params is None:
            return self.module(x)
        if isinstance(params, dict) and not params:
            raise ValueError("MAML.forward: params is empty; pass the dict adapt() returned, or None for the model's "
                             "own weights")
        _check_params_of(params, self.module, "MAML.forward: params")
        own = dict(self.module.named_parameters())
        first = next(iter(params))
        single = params[first].dim() == own[first].dim()
        x = compute_inputs(x, compute_dtype(params[first].dtype))
        if single:
            return self.task_model({k: v.unsqueeze(0) for k, v in params.items()}, x.unsqueeze(0))[0]
        T = params[first].shape[0]
        if lead_tensor(x).shape[0] != T:
            raise ValueError(f"MAML.forward: the adapted weights hold {T} task(s) but x holds "
                             f"{lead_tensor(x).shape[0]} ({list(lead_tensor(x).shape)}: [T, N, ...]); pass the inputs of "
                             "the tasks the weights were adapted on, one [N, ...] set per task")
        return self.task_model(params, x)
