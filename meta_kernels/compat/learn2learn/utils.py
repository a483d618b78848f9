"""learn2learn.utils' module helpers: clone_module, update_module, detach_module, clone_parameters."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from meta_kernels.compat.learn2learn.algorithms import clone_module


def clone_parameters(param_list: Iterable[Tensor]) -> list[Tensor]:
    """Differentiable clones of the tensors."""
    params = list(param_list)
    others = [type(p).__name__ for p in params if not isinstance(p, Tensor)]
    if others:
        kind = others[0]
        raise TypeError(f"clone_parameters takes tensors (e.g. model.parameters()), got {kind}")
    return [p.clone() for p in params]


def update_module(module: nn.Module, updates: Sequence[Tensor] | None = None, memo: dict | None = None) -> nn.Module:
    """Replaces, in place and differentiably, every parameter p of the module tree by p + update:
    `updates` gives one per parameter (module.parameters() order); without it, each parameter's
    own `.update` attribute is used (as learn2learn's maml_update sets it). A shared parameter is
    updated once and stays shared."""
    if updates is not None:
        params = list(module.parameters())
        updates = list(updates)
        if len(updates) != len(params):
            raise ValueError(f"update_module: {len(updates)} updates for {len(params)} parameters; give one per "
                             "tensor of module.parameters(), in that order")
        for p, u in zip(params, updates):
            if u is not None and u.shape != p.shape:
                raise ValueError(f"update_module: an update of shape {list(u.shape)} for a parameter of shape "
                                 f"{list(p.shape)}")
            p.update = u
    memo = {} if memo is None else memo
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is None or getattr(t, "update", None) is None:
                    continue
                if id(t) not in memo:
                    memo[id(t)] = t + t.update
                store[key] = memo[id(t)]
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()
    return module


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Detaches every parameter (and every buffer that requires grad) of the module tree from its
    graph, in place; with keep_requires_grad the detached tensors still require grad."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"detach_module takes an nn.Module, got {type(module).__name__}")
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = p.detach().requires_grad_(keep_requires_grad and p.requires_grad)
        for key, b in m._buffers.items():
            if b is not None and b.requires_grad:
                m._buffers[key] = b.detach().requires_grad_(keep_requires_grad)
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()


__all__ = ["clone_module", "clone_parameters", "detach_module", "update_module"]
