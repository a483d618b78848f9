"""Argument checks for the Python-side backends (reference, triton). The compiled backends
run the same checks in C++ (csrc/common.h) with the same wording, so every backend rejects bad
input with a ValueError that names the argument."""
from __future__ import annotations

import torch
from torch import Tensor


def uniform_list(tensors, name: str) -> None:
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty; pass at least one tensor")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise ValueError(f"{name}[{i}] must be floating point, got {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name}[{i}] is {t.dtype} but {name}[0] is {first.dtype}; all tensors of one call share a dtype")
        if t.device != first.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {first.device}")


def same_as(tensors, ref, name: str, ref_name: str) -> None:
    if len(tensors) != len(ref):
        raise ValueError(f"{name} has {len(tensors)} tensors but {ref_name} has {len(ref)}; pass one per tensor")
    for i, (t, r) in enumerate(zip(tensors, ref)):
        if t.shape != r.shape:
            raise ValueError(f"{name}[{i}] has shape {list(t.shape)} but {ref_name}[{i}] has shape {list(r.shape)}")
        if t.dtype != r.dtype:
            raise ValueError(f"{name}[{i}] is {t.dtype} but {ref_name}[{i}] is {r.dtype}")
        if t.device != r.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {ref_name}[{i}] is on {r.device}")


def leading_tasks(tensors, name: str) -> int:
    for i, t in enumerate(tensors):
        if t.dim() < 1:
            raise ValueError(f"{name}[{i}] is 0-dim but a leading task dim is required")
    T = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != T:
            raise ValueError(f"{name}[{i}] has {t.shape[0]} tasks in dim 0 but {name}[0] has {T}")
    return T


def lrs(lrs: Tensor, n: int, like: Tensor) -> None:
    if lrs.dim() != 1 or lrs.numel() != n:
        raise ValueError(f"lrs must be a 1-D tensor with one rate per tensor ({n}), got shape {list(lrs.shape)}")
    if lrs.device != like.device:
        raise ValueError(f"lrs is on {lrs.device} but params are on {like.device}")
    if not lrs.is_floating_point():
        raise ValueError(f"lrs must be floating point, got {lrs.dtype}")


def scale(scale: Tensor | None, params) -> None:
    if scale is None:
        return
    if scale.dim() != 1:
        raise ValueError(f"scale must be 1-D with one factor per task, got shape {list(scale.shape)}")
    if scale.device != params[0].device:
        raise ValueError(f"scale is on {scale.device} but params are on {params[0].device}")
    if not scale.is_floating_point():
        raise ValueError(f"scale must be floating point, got {scale.dtype}")
    T = leading_tasks(params, "params")
    if scale.numel() != T:
        raise ValueError(f"scale has {scale.numel()} entries but params have {T} tasks in dim 0")


def sgd_args(params, grads, lrs_t, scale_t) -> None:
    uniform_list(params, "params")
    same_as(grads, params, "grads", "params")
    lrs(lrs_t, len(params), params[0])
    scale(scale_t, params)


def batch_norm_args(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"x must be [T, N, C, *spatial], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    T, C = x.shape[0], x.shape[2]
    if weight.dim() != 2 or tuple(weight.shape) != (T, C):
        raise ValueError(f"weight must be [T, C] = [{T}, {C}] for x of shape {list(x.shape)}, got {list(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias.shape != weight.shape:
        raise ValueError(f"bias must have the shape of weight {list(weight.shape)}, got {list(bias.shape)}")


def reptile_args(params, adapted) -> None:
    uniform_list(params, "params")
    if len(adapted) != len(params):
        raise ValueError(f"adapted has {len(adapted)} tensors but params has {len(params)}; pass one per tensor")
    T = leading_tasks(adapted, "adapted")
    if T < 1:
        raise ValueError("adapted must hold at least one task in dim 0")
    for i, (p, a) in enumerate(zip(params, adapted)):
        if a.shape[1:] != p.shape:
            raise ValueError(f"adapted[{i}] has shape {list(a.shape)} but must be [T, *params[{i}].shape] = [T, {list(p.shape)}]")
        if a.dtype != p.dtype or a.device != p.device:
            raise ValueError(f"adapted[{i}] must match params[{i}] in dtype and device")


def max_pool2x2_relu_args(x: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be [..., H, W], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.shape[-2] < 2 or x.shape[-1] < 2:
        raise ValueError(f"max_pool2x2_relu needs H >= 2 and W >= 2, got x of shape {list(x.shape)}")


def _pool_index_args(index: Tensor, other: Tensor, name: str) -> None:
    if index.dtype != torch.int8:
        raise ValueError(f"index must be torch.int8 (from max_pool2x2_relu), got {index.dtype}")
    if index.device != other.device:
        raise ValueError(f"index is on {index.device} but {name} is on {other.device}")


def max_pool2x2_relu_backward_args(grad_out: Tensor, index: Tensor, height: int, width: int) -> None:
    if grad_out.dim() < 2 or not grad_out.is_floating_point():
        raise ValueError(f"grad_out must be a floating [..., H / 2, W / 2] tensor, got {grad_out.dtype} {list(grad_out.shape)}")
    _pool_index_args(index, grad_out, "grad_out")
    if index.shape != grad_out.shape:
        raise ValueError(f"index has shape {list(index.shape)} but grad_out has shape {list(grad_out.shape)}")
    if (height // 2, width // 2) != tuple(grad_out.shape[-2:]):
        raise ValueError(f"height {height} and width {width} do not pool to grad_out's "
                         f"{grad_out.shape[-2]} x {grad_out.shape[-1]}")


def max_pool2x2_relu_gather_args(grad_x: Tensor, index: Tensor) -> None:
    if grad_x.dim() < 2 or not grad_x.is_floating_point():
        raise ValueError(f"grad_x must be a floating [..., H, W] tensor, got {grad_x.dtype} {list(grad_x.shape)}")
    _pool_index_args(index, grad_x, "grad_x")
    pooled = [*grad_x.shape[:-2], grad_x.shape[-2] // 2, grad_x.shape[-1] // 2]
    if list(index.shape) != pooled:
        raise ValueError(f"index has shape {list(index.shape)} but grad_x of shape {list(grad_x.shape)} pools to {pooled}")


# conv3x3_bn_pool_relu: input layers with at most this many channels per group (csrc/common.h).
CONV_BN_POOL_MAX_IN_CHANNELS = 4


def conv3x3_bn_pool_relu_args(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor,
                              groups: int) -> None:
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [groups * C_out, C_in, 3, 3], got shape {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} but x is {x.dtype}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    cin, out_channels = weight.shape[1], weight.shape[0]
    if x.dim() == 4 and x.shape[1] != groups * cin:
        raise ValueError(f"x has {x.shape[1]} channels but groups ({groups}) * weight's C_in ({cin}) is {groups * cin}")
    if out_channels % groups:
        raise ValueError(f"weight's {out_channels} output channels do not split into {groups} groups")
    patch_input_args(x, groups)
    for name, t in (("gamma", gamma), ("beta", beta), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != out_channels:
            raise ValueError(f"{name} must be [{out_channels}] (one per output channel), got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")


def patch_input_args(x: Tensor, groups: int) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating [N, groups * C_in, H, W] tensor, got {x.dtype} {list(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"x's {x.shape[1]} channels do not split into {groups} groups")
    cin = x.shape[1] // groups
    if not 1 <= cin <= CONV_BN_POOL_MAX_IN_CHANNELS:
        raise ValueError(f"conv3x3_bn_pool_relu is for input layers with 1 to {CONV_BN_POOL_MAX_IN_CHANNELS} channels "
                         f"per group, got {cin}; use conv2d + batch_norm + max_pool2x2_relu")
    if x.shape[0] < 1 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"conv3x3_bn_pool_relu needs N >= 1, H >= 2 and W >= 2, got x of shape {list(x.shape)}")


def patch_pooled_args(pooled: Tensor, name: str, index: Tensor, x: Tensor, pbar: Tensor, groups: int) -> None:
    patch_input_args(x, groups)
    N, _, H, W = x.shape
    if pooled.dim() != 4 or pooled.shape[0] != N or pooled.shape[1] % groups or tuple(pooled.shape[2:]) != (H // 2, W // 2):
        raise ValueError(f"{name} must be [N, groups * C_out, H / 2, W / 2] for x of shape {list(x.shape)}, "
                         f"got {list(pooled.shape)}")
    if index.dtype != torch.int8 or index.shape != pooled.shape:
        raise ValueError(f"index must be the int8 index output of conv3x3_bn_pool_relu, of shape {list(pooled.shape)}")
    K = 9 * (x.shape[1] // groups)
    if tuple(pbar.shape) != (groups, K):
        raise ValueError(f"pbar must be [{groups}, {K}] (conv3x3_bn_pool_relu_moments), got {list(pbar.shape)}")
