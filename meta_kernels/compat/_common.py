"""What both compat layers share: the module tree with swappable weights, and the update of a
list of weights as one fused `sgd_step` launch."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from meta_kernels import ops
from meta_kernels.meta.batching import BatchedModel


def clone_tree(module: nn.Module, weight: Callable[[Tensor], Tensor], buffer: Callable[[Tensor], Tensor],
               memo: dict | None = None) -> nn.Module:
    """A copy of the module tree (new module objects, the same attributes) whose weights are
    `weight(p)` and buffers `buffer(b)`; a tensor or module shared by several modules stays shared."""
    memo = {} if memo is None else memo
    if not isinstance(module, nn.Module):
        return module
    if id(module) in memo:
        return memo[id(module)]
    clone = memo[id(module)] = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: None if p is None else _memo(memo, p, weight) for k, p in module._parameters.items()}
    clone._buffers = {k: None if b is None else _memo(memo, b, buffer) for k, b in module._buffers.items()}
    clone._modules = {k: clone_tree(m, weight, buffer, memo) for k, m in module._modules.items()}
    refresh_flat_weights(clone)
    return clone


def _memo(memo: dict, t: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
    if id(t) not in memo:
        memo[id(t)] = make(t)
    return memo[id(t)]


def replace_weights(module: nn.Module, new: dict[int, Tensor]) -> None:
    """Puts new[id(old)] in place of every weight `old` of the tree that has a replacement."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and id(p) in new:
                m._parameters[k] = new[id(p)]
        refresh_flat_weights(m)


def refresh_flat_weights(m: nn.Module) -> None:
    # RNN / LSTM / GRU run from a list of their weights built at construction: point it at the new ones.
    if isinstance(m, nn.RNNBase):
        m._init_flat_weights()


# The layers whose task-aware forms run on the fused ops (conv3x3_bn_pool_relu, batch_norm,
# max_pool2x2_relu); a Linear or an MLP runs faster as it is.
_FUSED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class OneTaskRunner:
    """A module's own forward for one task through the batching engine's task-aware view (T = 1),
    so that its convs and batch norms run on the fused ops. Forward plus MAML's double backward:
    1.37x a plain call for a Conv4 with BatchNorm, 1.2x for a CNN without, 0.66x for an MLP
    (measured with 5-way 1-shot Omniglot tasks). Used for models with such layers and no layer the
    engine would vmap or loop; otherwise, or when the view cannot run the model (a forward that
    reads a conv's weight itself), the module runs as it is."""

    def __init__(self, module: nn.Module):
        self.module, self.engine = module, None
        per_task = {f"{prefix}.{name}" if prefix else name for prefix, m in module.named_modules(remove_duplicate=False)
                    if type(m) in _FUSED_LAYERS for name, p in m._parameters.items() if p is not None}
        if per_task:
            engine = BatchedModel(module)
            if not any(plan.how.startswith(("vmap", "loop")) for plan in engine.plans):
                self.engine, self.per_task = engine, per_task

    def __call__(self, args: tuple, kwargs: dict):
        if self.engine is not None:
            params = {k: v.unsqueeze(0) if k in self.per_task else v for k, v in self.module.named_parameters()}
            try:
                return self.engine.one_task(params, args, kwargs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                warnings.warn(f"meta_kernels.compat: {type(self.module).__name__} cannot run on the fused ops "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it runs as it is", stacklevel=3)
                self.engine = None
        return self.module(*args, **kwargs)


def fused_sgd(params: Sequence[Tensor], directions: Sequence[Tensor], lrs: Sequence[float | Tensor]) -> list[Tensor]:
    """params[i] - lrs[i] * directions[i] for every i, as one `sgd_step` launch per dtype and device
    (one for a usual model). A rate may be a tensor that requires grad (a learned rate)."""
    out: list[Tensor | None] = [None] * len(params)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, p.device), []).append(i)
    for (dtype, device), idx in groups.items():
        rate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rates = [lrs[i] for i in idx]
        if any(isinstance(r, Tensor) for r in rates):
            rate_vec = torch.stack([torch.as_tensor(r, dtype=rate_dtype, device=device).reshape(()) for r in rates])
        else:
            rate_vec = torch.tensor([float(r) for r in rates], dtype=rate_dtype, device=device)
        new = ops.sgd_step([params[i] for i in idx], [directions[i] for i in idx], rate_vec)
        for i, t in zip(idx, new):
            out[i] = t
    return out


def task_sum(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """loss_fn made task-batched: for outputs [T, N, ...] and targets [T, N, ...] it returns the
    sum over tasks of loss_fn(outputs[t], targets[t]). Its gradient for weights that carry a task
    dim is each task's own gradient, which is what a batched learner's `adapt` needs."""
    def summed(outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.shape[0] != targets.shape[0]:
            raise ValueError(f"task_sum: outputs have {outputs.shape[0]} tasks in dim 0 but targets have "
                             f"{targets.shape[0]}; pass both as [T, N, ...]")
        return torch.stack([loss_fn(o, t) for o, t in zip(outputs, targets)]).sum()
    return summed
