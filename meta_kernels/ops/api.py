"""Public front-ends of the fused ops. Each picks a backend (see `_backend`), converts
convenience arguments, and calls the op of that backend."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _validate, reference

_COMPILED = ("cpp", "cuda")
# Backends whose arguments are checked here; the compiled ones check the same in C++.
_CHECKED_IN_PYTHON = ("reference", "triton")


def _ns(backend: str):
    if backend in _COMPILED:
        return torch.ops.meta_kernels
    from meta_kernels import triton as _triton_ops  # noqa: F401  (registers the ops on first use)
    return torch.ops.meta_kernels_triton


def _as_lrs(lrs, n: int, like: Tensor) -> Tensor:
    if isinstance(lrs, Tensor):
        return lrs
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32  # keep float64 rates exact
    if isinstance(lrs, (int, float)):
        return torch.full((n,), float(lrs), dtype=dtype, device=like.device)
    return torch.tensor([float(v) for v in lrs], dtype=dtype, device=like.device)


def _check_no_grad_inplace(params: Sequence[Tensor], op: str) -> None:
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise RuntimeError(f"{op} updates tensors in place and records no graph, but params require grad; "
                           "call it under torch.no_grad() or use the differentiable out-of-place op")


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], lrs: Tensor | float | Sequence[float],
             scale: Tensor | None = None, *, backend: str | None = None) -> list[Tensor]:
    """phi_i = params_i - lrs[i] * scale[t] * grads_i for every tensor of the list in one launch.

    `lrs` holds one rate per tensor (a 1-D tensor that may require grad, or a float for all);
    `scale` ([T], optional) is a per-task factor (the clip factor) and requires every tensor to
    carry the task dim first. Differentiable in params, grads, lrs and scale."""
    params, grads = list(params), list(grads)
    if not params:
        raise ValueError("params is empty; pass at least one tensor")
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    if name in _CHECKED_IN_PYTHON:
        _validate.sgd_args(params, grads, lrs, scale)
    if name == "reference":
        return reference.sgd_step(params, grads, lrs, scale)
    return _ns(name).sgd_step(params, grads, lrs, scale)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], lrs: Tensor | float | Sequence[float],
              scale: Tensor | None = None, *, backend: str | None = None) -> None:
    """In-place sgd_step for paths that build no graph (FOMAML, Reptile, evaluation)."""
    params, grads = list(params), list(grads)
    if not params:
        raise ValueError("params is empty; pass at least one tensor")
    _check_no_grad_inplace(params, "sgd_step_")
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    if name in _CHECKED_IN_PYTHON:
        _validate.sgd_args(params, grads, lrs, scale)
    if name == "reference":
        with torch.no_grad():
            for p, new in zip(params, reference.sgd_step(params, grads, lrs, scale)):
                p.copy_(new)
        return
    _ns(name).sgd_step_(params, grads, lrs, scale)


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float, eps: float = 1e-6, *,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-task global L2 norm over grads (each [T, ...]) and the factor min(1, max_norm / (norm + eps)).

    Returns (norm [T], factor [T]) in float32 (float64 for float64 grads). A non-finite norm is
    returned as is and its factor is NaN, so a blown-up task never updates silently; check the
    norm to report it. Differentiable in grads."""
    grads = list(grads)
    if not grads:
        raise ValueError("grads is empty; pass at least one tensor")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    name = _backend.resolve(backend, grads[0].device)
    if name in _CHECKED_IN_PYTHON:
        _validate.uniform_list(grads, "grads")
        _validate.leading_tasks(grads, "grads")
    if name == "reference":
        return reference.clip_grad_norm(grads, max_norm, eps)
    return _ns(name).clip_grad_norm(grads, float(max_norm), float(eps))


def batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
               running_mean: Tensor | None = None, running_var: Tensor | None = None, momentum: float = 0.1,
               backend: str | None = None) -> Tensor:
    """Training-mode batch norm with statistics per (task, channel): x [T, N, C, *spatial].

    weight/bias are [T, C] (per task, e.g. adapted per task in the inner loop) or [C] (shared);
    None means no affine. If running_mean/running_var ([C], or [T, C] per task) are given they
    are updated in place with the batch statistics (unbiased variance), without a graph."""
    if x.dim() < 3:
        raise ValueError(f"x must be [T, N, C, *spatial], got shape {list(x.shape)}")
    T, C = x.shape[0], x.shape[2]
    weight = x.new_ones((T, C)) if weight is None else weight
    bias = x.new_zeros((T, C)) if bias is None else bias
    # Shared [C] affine: expand so autograd sums the per-task gradients back onto it.
    weight = weight.expand(T, C) if weight.dim() == 1 else weight
    bias = bias.expand(T, C) if bias.dim() == 1 else bias
    name = _backend.resolve(backend, x.device)
    if name in _CHECKED_IN_PYTHON:
        _validate.batch_norm_args(x, weight, bias)
    if name == "reference":
        out, mean, rstd = reference.batch_norm(x, weight, bias, eps)
    else:
        out, mean, rstd = _ns(name).batch_norm(x, weight.contiguous(), bias.contiguous(), float(eps))
    if running_mean is not None or running_var is not None:
        _update_running_stats(x, mean, rstd, eps, running_mean, running_var, momentum)
    return out


def _update_running_stats(x, mean, rstd, eps, running_mean, running_var, momentum) -> None:
    count = x.numel() // (x.shape[0] * x.shape[2])
    with torch.no_grad():
        var = (rstd.detach().pow(-2) - eps) * (count / max(count - 1, 1))
        for running, batch in ((running_mean, mean.detach()), (running_var, var)):
            if running is None:
                continue
            if running.shape == batch.shape[1:]:
                batch = batch.mean(0)  # one running statistic shared by all tasks
            elif running.shape != batch.shape:
                raise ValueError(f"running statistics must be [C] or [T, C] = {list(batch.shape)}, "
                                 f"got {list(running.shape)}")
            running.mul_(1 - momentum).add_(batch.to(running.dtype), alpha=momentum)


def max_pool2x2_relu(x: Tensor, *, backend: str | None = None) -> Tensor:
    """relu(max_pool2d(x, 2)) over the last two dims of x [..., H, W] in one pass (an odd last row
    or column is dropped, as in max_pool2d). Differentiable to any order."""
    name = _backend.resolve(backend, x.device)
    if name in _CHECKED_IN_PYTHON:
        _validate.max_pool2x2_relu_args(x)
    if name == "reference":
        return reference.max_pool2x2_relu(x)[0]
    return _ns(name).max_pool2x2_relu(x)[0]


# Backends with a kernel of conv3x3_bn_pool_relu (a CPU op: on GPUs the input layer's conv runs in
# cuDNN and the block takes the composed ops).
_CONV_BN_POOL_BACKENDS = ("cpp", "reference")


def has_conv3x3_bn_pool_relu(device: torch.device, backend: str | None = None) -> bool:
    """Whether conv3x3_bn_pool_relu has a kernel for tensors of `device` on the chosen backend."""
    return _backend.resolve(backend, device) in _CONV_BN_POOL_BACKENDS


def conv3x3_bn_pool_relu(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, *, groups: int = 1,
                         eps: float = 1e-5, backend: str | None = None) -> Tensor:
    """max_pool2x2_relu(batch_norm(conv2d(x, weight, bias, padding=1, groups))) with the batch
    statistics of each output channel over (N, H, W), in one op for input layers of 1 to 4
    channels per group (x [N, groups * C_in, H, W], weight [groups * C_out, C_in, 3, 3], bias /
    gamma / beta [groups * C_out]). No tensor of the dense conv output's size is stored, in the
    forward, the backward or the double backward: the statistics come from the input's 3x3-patch
    moments, the gradients of weight, gamma and beta from sums of the patches at the pooled maxima.
    Backends: cpp and reference (others raise). Differentiable to any order."""
    name = _backend.resolve(backend, x.device)
    if name not in _CONV_BN_POOL_BACKENDS:
        raise RuntimeError(f"conv3x3_bn_pool_relu has no {name} kernel; it runs on the cpp and reference backends. "
                           "On other backends compose conv2d, batch_norm and max_pool2x2_relu (meta_kernels.models.Conv4 "
                           "does so itself)")
    if name in _CHECKED_IN_PYTHON:
        _validate.conv3x3_bn_pool_relu_args(x, weight, bias, gamma, beta, groups)
    if name == "reference":
        return reference.conv3x3_bn_pool_relu(x, weight, bias, gamma, beta, groups, eps)[0]
    return _ns(name).conv3x3_bn_pool_relu(x, weight, bias, gamma, beta, groups, float(eps))[0]


def reptile_update_(params: Sequence[Tensor], adapted: Sequence[Tensor], epsilon: float, *,
                    backend: str | None = None) -> None:
    """params_i += epsilon * (mean over tasks of adapted_i - params_i), in place, fused over the list.

    adapted_i is [T, *params_i.shape] (the adapted weights of T tasks)."""
    params, adapted = list(params), list(adapted)
    if not params:
        raise ValueError("params is empty; pass at least one tensor")
    _check_no_grad_inplace(params, "reptile_update_")
    name = _backend.resolve(backend, params[0].device)
    if name in _CHECKED_IN_PYTHON:
        _validate.reptile_args(params, adapted)
    if name == "reference":
        return reference.reptile_update_(params, adapted, epsilon)
    _ns(name).reptile_update_(params, adapted, float(epsilon))
