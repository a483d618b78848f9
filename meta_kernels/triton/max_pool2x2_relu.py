"""Triton relu(max_pool2d(x, 2)) over x [..., H, W], its backward and the backward's adjoint (a
gather): one lane per output element, reading (forward, gather) or writing (backward) its 2x2 window."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.triton._common import tl_compute_dtype

BLOCK = 256


@triton.jit
def _window(e, H, W, Ho, Wo):
    """Offset of the top-left corner of output element e's window."""
    row = e // Wo
    j = e % Wo
    plane = row // Ho
    i = row % Ho
    return (plane * H + 2 * i) * W + 2 * j


@triton.jit
def _pool_relu_kernel(x_ptr, out_ptr, index_ptr, total, H, W, Ho, Wo, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    top = _window(e, H, W, Ho, Wo)
    m = tl.load(x_ptr + top, mask=mask, other=0.0).to(COMPUTE)
    at = tl.zeros((BLOCK,), dtype=tl.int8)
    for q in tl.static_range(1, 4):
        v = tl.load(x_ptr + top + (q // 2) * W + (q % 2), mask=mask, other=0.0).to(COMPUTE)
        # First maximum wins ties; a NaN wins and propagates (as max_pool2d and relu do).
        take = (v > m) | ((v != v) & (m == m))
        m = tl.where(take, v, m)
        at = tl.where(take, q, at).to(tl.int8)
    keep = (m > 0) | (m != m)
    tl.store(out_ptr + e, tl.where(keep, m, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(index_ptr + e, tl.where(keep, at, -1).to(tl.int8), mask=mask)


@triton.jit
def _pool_relu_backward_kernel(go_ptr, index_ptr, gx_ptr, total, H, W, Ho, Wo, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    top = _window(e, H, W, Ho, Wo)
    g = tl.load(go_ptr + e, mask=mask, other=0.0)
    k = tl.load(index_ptr + e, mask=mask, other=-1)
    for q in tl.static_range(0, 4):
        tl.store(gx_ptr + top + (q // 2) * W + (q % 2), tl.where(k == q, g, 0.0).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_relu_gather_kernel(gx_ptr, index_ptr, out_ptr, total, H, W, Ho, Wo, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    k = tl.load(index_ptr + e, mask=mask, other=-1).to(tl.int32)
    at = _window(e, H, W, Ho, Wo) + (tl.maximum(k, 0) // 2) * W + tl.maximum(k, 0) % 2
    v = tl.load(gx_ptr + at, mask=mask & (k >= 0), other=0.0)
    tl.store(out_ptr + e, v, mask=mask)


def max_pool2x2_relu(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.contiguous()
    H, W = x.shape[-2], x.shape[-1]
    shape = (*x.shape[:-2], H // 2, W // 2)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    index = torch.empty(shape, dtype=torch.int8, device=x.device)
    total = out.numel()
    if total:
        _pool_relu_kernel[(triton.cdiv(total, BLOCK),)](x, out, index, total, H, W, H // 2, W // 2,
                                                        COMPUTE=tl_compute_dtype(x.dtype), BLOCK=BLOCK)
    return out, index


def max_pool2x2_relu_backward(grad_out: Tensor, index: Tensor, height: int, width: int) -> Tensor:
    grad_out, index = grad_out.contiguous(), index.contiguous()
    shape = (*grad_out.shape[:-2], height, width)
    # Every pooled window is written whole; only a dropped odd row / column needs zeros first.
    odd = height % 2 or width % 2
    gx = (torch.zeros if odd else torch.empty)(shape, dtype=grad_out.dtype, device=grad_out.device)
    total = grad_out.numel()
    if total:
        _pool_relu_backward_kernel[(triton.cdiv(total, BLOCK),)](grad_out, index, gx, total, height, width,
                                                                 grad_out.shape[-2], grad_out.shape[-1], BLOCK=BLOCK)
    return gx


def max_pool2x2_relu_gather(grad_x: Tensor, index: Tensor) -> Tensor:
    grad_x, index = grad_x.contiguous(), index.contiguous()
    out = torch.empty(index.shape, dtype=grad_x.dtype, device=grad_x.device)
    total = out.numel()
    if total:
        _pool_relu_gather_kernel[(triton.cdiv(total, BLOCK),)](grad_x, index, out, total, grad_x.shape[-2],
                                                               grad_x.shape[-1], index.shape[-2], index.shape[-1],
                                                               BLOCK=BLOCK)
    return out
