"""clip_grad_norm: per-task global L2 norm over a list of [T, ...] grads and the clip factor
min(1, max_norm / (norm + eps)). Checks, fake kernel, autograd and the front-end; kernels in
csrc/cpu/clip_grad_norm.cpp, csrc/cuda/clip_grad_norm.cu and meta_kernels/triton/clip_grad_norm.py."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, reference
from meta_kernels.tensor_utils import compute_dtype, task_view


def check_args(grads) -> int:
    _checks.uniform_list(grads, "grads")
    return _checks.leading_tasks(grads, "grads")


def _fake(grads, max_norm, eps):
    T = check_args(grads)
    dtype = compute_dtype(grads[0].dtype)
    return grads[0].new_empty((T,), dtype=dtype), grads[0].new_empty((T,), dtype=dtype)


def _setup(ctx, inputs, output):
    grads, max_norm, eps = inputs
    ctx.n, ctx.max_norm, ctx.eps = len(grads), max_norm, eps
    ctx.save_for_backward(*grads, output[0])


def _backward(ctx, grad_norm, grad_factor):
    saved = ctx.saved_tensors
    grads, norm = saved[:ctx.n], saved[ctx.n]
    denom = norm + ctx.eps
    clipped = torch.isfinite(norm) & (denom > ctx.max_norm)
    dfactor = torch.where(clipped, -ctx.max_norm / (denom * denom), torch.zeros_like(norm))
    dnorm = grad_norm + grad_factor * dfactor
    # d norm / d g = g / norm; zero where the norm is zero (subgradient, as torch.linalg.norm).
    coef = torch.where(norm > 0, dnorm / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return [(task_view(coef, g) * g).to(g.dtype) for g in grads], None, None


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float, eps: float = 1e-6, *,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-task global L2 norm over grads (each [T, ...]) and the factor min(1, max_norm / (norm + eps)).

    Returns (norm [T], factor [T]) in float32 (float64 for float64 grads). A non-finite norm is
    returned as is and its factor is NaN, so a blown-up task never updates silently; check the
    norm to report it. Differentiable in grads."""
    grads = _checks.non_empty(grads, "grads")
    # max_norm = inf is allowed: the inner loop asks for the norms alone that way.
    max_norm = _checks.scalar(max_norm, "max_norm", "> 0 (inf: no clipping)", lambda v: v > 0)
    # eps <= 0 makes the factor negative or infinite for small norms.
    eps = _checks.scalar(eps, "eps", "finite and > 0", lambda v: 0 < v < math.inf)
    name = _backend.resolve(backend, grads[0].device)
    op = reference.clip_grad_norm if name == "reference" else _registry.namespace(name).clip_grad_norm
    return _checks.checked_call(name, lambda: check_args(grads), lambda: op(grads, max_norm, eps))


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g).to(device).requires_grad_(),
             torch.randn(4, 5, 2, generator=g).to(device).requires_grad_()]
    return [("clip_grad_norm", (grads, 1.0, 1e-6))]


def _selfcheck(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 1027, generator=g, dtype=torch.float64)]
    torch.testing.assert_close(clip_grad_norm(grads, 1.0, backend=backend), reference.clip_grad_norm(grads, 1.0, 1e-6))


OP = _registry.add(_registry.OpDef(
    name="clip_grad_norm",
    kernels=(_registry.Kernel("clip_grad_norm", "(Tensor[] grads, float max_norm, float eps) -> (Tensor norm, Tensor factor)",
                              _fake, lambda ns: (_backward, _setup)),),
    backends=_backend.CONCRETE, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck, triton_module="clip_grad_norm"))
