"""sgd_step / sgd_step_: phi_i = theta_i - lrs[i] * scale[t] * g_i for every tensor of a list, in
one launch. Checks, fake kernels, autograd and the front-ends; kernels in csrc/cpu/sgd_step.cpp,
csrc/cuda/sgd_step.cu and meta_kernels/triton/sgd_step.py."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, reference
from meta_kernels.tensor_utils import task_view


# ---- checks ----------------------------------------------------------------------------------

def check_args(params, grads, lrs: Tensor, scale: Tensor | None) -> None:
    _checks.uniform_list(params, "params")
    _checks.same_as(grads, params, "grads", "params")
    if lrs.dim() != 1 or lrs.numel() != len(params):
        raise ValueError(f"lrs must be a 1-D tensor with one rate per tensor ({len(params)}), got shape {list(lrs.shape)}")
    if lrs.device != params[0].device:
        raise ValueError(f"lrs is on {lrs.device} but params are on {params[0].device}")
    if not lrs.is_floating_point():
        raise ValueError(f"lrs must be floating point, got {lrs.dtype}")
    if scale is None:
        return
    if scale.dim() != 1:
        raise ValueError(f"scale must be 1-D with one factor per task, got shape {list(scale.shape)}")
    if scale.device != params[0].device:
        raise ValueError(f"scale is on {scale.device} but params are on {params[0].device}")
    if not scale.is_floating_point():
        raise ValueError(f"scale must be floating point, got {scale.dtype}")
    T = _checks.leading_tasks(params, "params")
    if scale.numel() != T:
        raise ValueError(f"scale has {scale.numel()} entries but params have {T} tasks in dim 0")


# ---- fake kernels ----------------------------------------------------------------------------

def _fake(params, grads, lrs, scale):
    check_args(params, grads, lrs, scale)
    return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


def _fake_(params, grads, lrs, scale):
    check_args(params, grads, lrs, scale)


# ---- autograd --------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    params, grads, lrs, scale = inputs
    # The grads enter only the gradients of lrs and scale: with fixed rates and no clip factor in
    # the graph they are not kept (T copies of the parameters per inner step).
    ctx.kept = len(params) if lrs.requires_grad or (scale is not None and scale.requires_grad) else 0
    ctx.save_for_backward(*grads[:ctx.kept], lrs, scale)


def _backward(ctx, grad_outs):
    saved = ctx.saved_tensors
    grads, lrs, scale = saved[:ctx.kept], saved[ctx.kept], saved[ctx.kept + 1]
    need_p, need_g, need_lrs, need_scale = ctx.needs_input_grad
    grad_g, grad_lrs, grad_scale = None, None, None
    lr_items = lrs.unbind(0)
    if need_g:
        grad_g = []
        for go, lr in zip(grad_outs, lr_items):
            coef = -lr.to(go.dtype)
            if scale is not None:
                coef = coef * task_view(scale.to(go.dtype), go)
            grad_g.append(coef * go)
    if need_lrs or need_scale:
        # <g, go> per tensor and task, reused by both the lrs and the scale gradients.
        inner = [(g * go).reshape(g.shape[0], -1).sum(1) if scale is not None else (g * go).sum()
                 for g, go in zip(grads, grad_outs)]
        if need_lrs:
            grad_lrs = -torch.stack([(d * scale.to(d.dtype)).sum() if scale is not None else d for d in inner])
            grad_lrs = grad_lrs.to(lrs.dtype)
        if need_scale:
            grad_scale = -sum(lr.to(d.dtype) * d for lr, d in zip(lr_items, inner)).to(scale.dtype)
    return (list(grad_outs) if need_p else None), grad_g, grad_lrs, grad_scale


# ---- front-ends ------------------------------------------------------------------------------

def _as_lrs(lrs, n: int, like: Tensor) -> Tensor:
    if isinstance(lrs, Tensor):
        return lrs
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32  # keep float64 rates exact
    if isinstance(lrs, (int, float)):
        return torch.full((n,), float(lrs), dtype=dtype, device=like.device)
    return torch.tensor([float(v) for v in lrs], dtype=dtype, device=like.device)


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], lrs: Tensor | float | Sequence[float],
             scale: Tensor | None = None, *, backend: str | None = None) -> list[Tensor]:
    """phi_i = params_i - lrs[i] * scale[t] * grads_i for every tensor of the list in one launch.

    `lrs` holds one rate per tensor (a 1-D tensor that may require grad, or a float for all);
    `scale` ([T], optional) is a per-task factor (the clip factor) and requires every tensor to
    carry the task dim first. Differentiable in params, grads, lrs and scale."""
    params, grads = _checks.non_empty(params, "params"), list(grads)
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    op = reference.sgd_step if name == "reference" else _registry.namespace(name).sgd_step
    return _checks.checked_call(name, lambda: check_args(params, grads, lrs, scale),
                                lambda: op(params, grads, lrs, scale))


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], lrs: Tensor | float | Sequence[float],
              scale: Tensor | None = None, *, backend: str | None = None) -> None:
    """In-place sgd_step for paths that build no graph (FOMAML, Reptile, evaluation)."""
    params, grads = _checks.non_empty(params, "params"), list(grads)
    _checks.no_graph_for_in_place(params, "sgd_step_")
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    op = _reference_in_place if name == "reference" else _registry.namespace(name).sgd_step_
    _checks.checked_call(name, lambda: check_args(params, grads, lrs, scale), lambda: op(params, grads, lrs, scale))


def _reference_in_place(params, grads, lrs, scale) -> None:
    with torch.no_grad():
        for p, new in zip(params, reference.sgd_step(params, grads, lrs, scale)):
            p.copy_(new)


# ---- samples for opcheck and the self-check --------------------------------------------------

def _samples(device, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().to(device).requires_grad_(requires_grad)
    params, grads = [rnd(4, 3), rnd(4, 5, 2)], [rnd(4, 3), rnd(4, 5, 2)]
    lrs = torch.rand(2, generator=g).to(device).requires_grad_(requires_grad)
    scale = torch.rand(4, generator=g).to(device).requires_grad_(requires_grad)
    return params, grads, lrs, scale


def _opcheck_cases(device):
    params, grads, lrs, scale = _samples(device, True)
    return [("sgd_step", (params, grads, lrs, scale)), ("sgd_step", (params, grads, lrs, None)),
            ("sgd_step_", _samples(device, False, seed=1))]


def _selfcheck(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    params, grads = [rnd(3, 5, 7), rnd(3, 1027)], [rnd(3, 5, 7), rnd(3, 1027)]
    lrs, scale = torch.tensor([0.1, 0.3], dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sgd_step(params, grads, lrs, scale, backend=backend),
                               reference.sgd_step(params, grads, lrs, scale))


_SCHEMA_OUT = "(Tensor[] params, Tensor[] grads, Tensor lrs, Tensor? scale) -> Tensor[]"
_SCHEMA_IN_PLACE = "(Tensor(a!)[] params, Tensor[] grads, Tensor lrs, Tensor? scale) -> ()"

OP = _registry.add(_registry.OpDef(
    name="sgd_step",
    kernels=(_registry.Kernel("sgd_step", _SCHEMA_OUT, _fake, lambda ns: (_backward, _setup)),
             _registry.Kernel("sgd_step_", _SCHEMA_IN_PLACE, _fake_)),
    backends=_backend.CONCRETE, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck, triton_module="sgd_step"))
