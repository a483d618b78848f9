"""momentum_step / momentum_step_: the heavy-ball inner update of torch.optim.SGD(momentum=mu)
for a whole list of tensors in one launch,

    b_i' = mu * b_i + scale[t] * g_i,    phi_i = theta_i - lrs[i] * rates_i * b_i'

(rates_i: optional per-element rates, Meta-SGD). Checks, fake kernels, autograd (its backward is
made of torch ops, so it is differentiable again) and the front-ends; kernels in
csrc/cpu/momentum_step.cpp, csrc/cuda/momentum_step.cu and meta_kernels/triton/momentum_step.py."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, _stateful, reference
from meta_kernels.ops.sgd_step import _as_lrs
from meta_kernels.tensor_utils import task_view, to_compute


def check_args(params, grads, bufs, lrs, scale, rates, momentum) -> None:
    _stateful.check_args(params, grads, {"bufs": bufs}, lrs, scale, rates)
    _checked_momentum(momentum)


def _checked_momentum(momentum) -> float:
    return _checks.scalar(momentum, "momentum", "finite and in [0, 1)", lambda v: 0 <= v < 1)


# ---- fake kernels ----------------------------------------------------------------------------

def _fake(params, grads, bufs, lrs, scale, rates, momentum):
    check_args(params, grads, bufs, lrs, scale, rates, momentum)
    new = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]
    return new(params), new(bufs)


def _fake_(params, grads, bufs, lrs, scale, rates, momentum):
    check_args(params, grads, bufs, lrs, scale, rates, momentum)


# ---- autograd --------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    params, grads, bufs, lrs, scale, rates, momentum = inputs
    ctx.n, ctx.momentum, ctx.has_scale, ctx.has_rates = len(params), momentum, scale is not None, rates is not None
    ctx.like = [(p.shape, p.dtype, p.device) for p in params]
    # The grads enter only the scale's gradient, the new buffers only the rates': kept only then.
    ctx.keep_grads = scale is not None and scale.requires_grad
    ctx.keep_bufs = lrs.requires_grad or (rates is not None and any(r.requires_grad for r in rates))
    ctx.save_for_backward(*(grads if ctx.keep_grads else []), *(output[1] if ctx.keep_bufs else []), lrs,
                          *([scale] if scale is not None else []), *(rates or []))


def _backward(ctx, grad_params, grad_bufs):
    saved, n = list(ctx.saved_tensors), ctx.n
    grads = [saved.pop(0) for _ in range(n)] if ctx.keep_grads else None
    new_bufs = [to_compute(saved.pop(0)) for _ in range(n)] if ctx.keep_bufs else None
    lrs = saved.pop(0)
    scale = saved.pop(0) if ctx.has_scale else None
    rates = saved if ctx.has_rates else None
    need_p, need_g, need_b, need_lrs, need_scale, need_rates, _ = ctx.needs_input_grad
    gp, gb = _stateful.upstream(grad_params, ctx.like), _stateful.upstream(grad_bufs, ctx.like)
    dtype = ctx.like[0][1]
    # The new buffer's whole gradient: its own and the one through phi = theta - rate * b'.
    total_b = [b - reference.step_rate(lrs, i, rates, p) * p for i, (p, b) in enumerate(zip(gp, gb))]
    grad_p = [g.to(dtype) for g in gp] if need_p else None
    grad_b = [(ctx.momentum * t).to(dtype) for t in total_b] if need_b else None
    grad_g = [reference.scaled_grad(t, scale).to(dtype) for t in total_b] if need_g else None
    grad_scale = _stateful.scale_gradient(grads, total_b, scale) if need_scale else None
    grad_lrs, grad_rates = _stateful.rate_gradients(new_bufs, gp, lrs, rates, need_lrs, need_rates)
    return grad_p, grad_g, grad_b, grad_lrs, grad_scale, grad_rates, None


# ---- front-ends ------------------------------------------------------------------------------

def momentum_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor],
                  lrs: Tensor | float | Sequence[float], scale: Tensor | None = None,
                  rates: Sequence[Tensor] | None = None, *, momentum: float,
                  backend: str | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """(new params, new momentum buffers): b' = momentum * b + scale[t] * g, phi = theta - lrs[i] *
    rates_i * b' for every tensor of the list in one launch. Buffers start at zero (then the first
    step is plain SGD, as in torch.optim.SGD). Differentiable in everything but momentum."""
    params, grads, bufs = _checks.non_empty(params, "params"), list(grads), list(bufs)
    rates = None if rates is None else list(rates)
    _checked_momentum(momentum)  # a scalar: cheap enough to check before every backend
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    op = reference.momentum_step if name == "reference" else _registry.namespace(name).momentum_step
    return _checks.checked_call(name, lambda: check_args(params, grads, bufs, lrs, scale, rates, momentum),
                                lambda: tuple(op(params, grads, bufs, lrs, scale, rates, float(momentum))))


def momentum_step_(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor],
                   lrs: Tensor | float | Sequence[float], scale: Tensor | None = None,
                   rates: Sequence[Tensor] | None = None, *, momentum: float, backend: str | None = None) -> None:
    """In-place momentum_step (params and bufs) for paths that build no graph."""
    params, grads, bufs = _checks.non_empty(params, "params"), list(grads), list(bufs)
    rates = None if rates is None else list(rates)
    _checks.no_graph_for_in_place(params + bufs, "momentum_step_")
    _checked_momentum(momentum)  # a scalar: cheap enough to check before every backend
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    op = _reference_in_place if name == "reference" else _registry.namespace(name).momentum_step_
    _checks.checked_call(name, lambda: check_args(params, grads, bufs, lrs, scale, rates, momentum),
                         lambda: op(params, grads, bufs, lrs, scale, rates, float(momentum)))


def _reference_in_place(params, grads, bufs, lrs, scale, rates, momentum) -> None:
    with torch.no_grad():
        new_p, new_b = reference.momentum_step(params, grads, bufs, lrs, scale, rates, momentum)
        for t, new in zip(params + bufs, new_p + new_b):
            t.copy_(new)


# ---- samples for opcheck and the self-check --------------------------------------------------

def _opcheck_cases(device):
    params, grads, bufs, lrs, scale, rates = _stateful.samples(device, True, 1)
    return [("momentum_step", (params, grads, bufs, lrs, scale, rates, 0.9)),
            ("momentum_step", (params, grads, bufs, lrs, None, None, 0.5)),
            ("momentum_step_", (*_stateful.samples(device, False, 1, seed=1), 0.9))]


def _selfcheck(backend: str) -> None:
    params, grads, bufs, lrs, scale, rates = [
        [t.double() for t in v] if isinstance(v, list) else v.double()
        for v in _stateful.samples("cpu", False, 1, seed=2)]
    ours = momentum_step(params, grads, bufs, lrs, scale, rates, momentum=0.9, backend=backend)
    torch.testing.assert_close(ours, reference.momentum_step(params, grads, bufs, lrs, scale, rates, 0.9))


_SCHEMA_OUT = ("(Tensor[] params, Tensor[] grads, Tensor[] bufs, Tensor lrs, Tensor? scale, Tensor[]? rates, "
               "float momentum) -> (Tensor[], Tensor[])")
_SCHEMA_IN_PLACE = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor lrs, Tensor? scale, "
                    "Tensor[]? rates, float momentum) -> ()")

OP = _registry.add(_registry.OpDef(
    name="momentum_step",
    kernels=(_registry.Kernel("momentum_step", _SCHEMA_OUT, _fake, lambda ns: (_backward, _setup)),
             _registry.Kernel("momentum_step_", _SCHEMA_IN_PLACE, _fake_)),
    backends=_backend.CONCRETE, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck, triton_module="momentum_step"))
