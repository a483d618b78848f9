"""What the inner optimizers with state (momentum_step, adam_step) share: their argument checks
(sgd_step's, plus the state lists and the per-element rates), the gradients of the rates and the
scale in their backward formulas, and opcheck samples."""
from __future__ import annotations

import torch
from torch import Tensor

from meta_kernels.ops import _checks, sgd_step
from meta_kernels.tensor_utils import to_compute


def check_args(params, grads, states: dict[str, list[Tensor]], lrs: Tensor, scale: Tensor | None,
               rates: list[Tensor] | None) -> None:
    """sgd_step's rules, each state list shaped as params, and rates[i] (Meta-SGD) of params[i]'s
    shape or of its shape without the leading task dim."""
    sgd_step.check_args(params, grads, lrs, scale)
    for name, state in states.items():
        _checks.same_as(state, params, name, "params")
    if rates is None:
        return
    _checks.same_as_dtype_device(rates, params, "rates", "params")
    for i, (r, p) in enumerate(zip(rates, params)):
        if tuple(r.shape) not in (tuple(p.shape), tuple(p.shape[1:])):
            raise ValueError(f"rates[{i}] has shape {list(r.shape)}; it must be params[{i}]'s shape {list(p.shape)} "
                             f"or that without the task dim {list(p.shape[1:])}")
    with_task_dim = [r.dim() == p.dim() for r, p in zip(rates, params)]
    if len(set(with_task_dim)) > 1:
        raise ValueError(f"rates[{with_task_dim.index(not with_task_dim[0])}] {'has' if not with_task_dim[0] else 'lacks'} "
                         f"the leading dim but rates[0] {'has' if with_task_dim[0] else 'lacks'} it; give it to all of "
                         "them or to none")


def rate_gradients(directions: list[Tensor], grad_params: list[Tensor], lrs: Tensor, rates: list[Tensor] | None,
                   need_lrs: bool, need_rates: bool):
    """(d lrs, d rates) of phi_i = theta_i - lrs[i] * rates_i * direction_i, given d phi."""
    grad_lrs = grad_rates = None
    if need_lrs:  # directions: [] unless kept for these gradients
        grad_lrs = -torch.stack([((d * to_compute(rates[i])) if rates is not None else d).mul(go).sum()
                                 for i, (d, go) in enumerate(zip(directions, grad_params))]).to(lrs.dtype)
    if need_rates:
        grad_rates = []
        for i, (d, go, r) in enumerate(zip(directions, grad_params, rates)):
            full = -lrs[i].to(d.dtype) * d * go
            grad_rates.append((full.sum(0) if r.dim() < full.dim() else full).to(r.dtype))
    return grad_lrs, grad_rates


def scale_gradient(grads: list[Tensor], grad_scaled: list[Tensor], scale: Tensor) -> Tensor:
    """d scale[t] = sum_i <g_i[t], d (s g)_i[t]>."""
    return sum((to_compute(g) * d).reshape(g.shape[0], -1).sum(1) for g, d in zip(grads, grad_scaled)).to(scale.dtype)


def upstream(grad_outs, like) -> list[Tensor]:
    """The gradients arriving at one output list, in compute precision; zeros where none arrive."""
    grad_outs = grad_outs if grad_outs is not None else [None] * len(like)
    return [to_compute(torch.zeros(shape, dtype=dtype, device=device)) if g is None else to_compute(g)
            for g, (shape, dtype, device) in zip(grad_outs, like)]


def samples(device, requires_grad: bool, n_states: int, seed: int = 0):
    """Small inputs for opcheck: (params, grads, *states, lrs, scale, rates), T = 4, two tensors."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().to(device)
    shapes = [(4, 3), (4, 5, 2)]
    lists = [[rnd(*s).requires_grad_(requires_grad) for s in shapes] for _ in range(2)]
    # States are running averages: the second moment is non-negative.
    states = [[rnd(*s).abs().requires_grad_(requires_grad) for s in shapes] for _ in range(n_states)]
    lrs = torch.rand(2, generator=g).to(device).requires_grad_(requires_grad)
    scale = torch.rand(4, generator=g).to(device).requires_grad_(requires_grad)
    rates = [rnd(*s[1:]).abs().requires_grad_(requires_grad) for s in shapes]
    return (*lists, *states, lrs, scale, rates)
