"""Triton clip_grad_norm: per-(task, block) partial sums of squares in one pass over the grads,
then a tiny reduction per task."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.tensor_utils import compute_dtype
from meta_kernels.triton._common import tl_compute_dtype

BLOCK = 1024


@triton.jit
def _sumsq_kernel(g_ptr, partial_ptr, inner, partial_stride, col0, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    g = tl.load(g_ptr + t * inner + offs, mask=mask, other=0.0).to(COMPUTE)
    tl.store(partial_ptr + t * partial_stride + col0 + b, tl.sum(g * g, axis=0))


def clip_grad_norm(grads: list[Tensor], max_norm: float, eps: float) -> tuple[Tensor, Tensor]:
    T = grads[0].shape[0]
    dtype = compute_dtype(grads[0].dtype)
    blocks = [triton.cdiv(g.numel() // T, BLOCK) if T else 0 for g in grads]
    partial = torch.zeros((T, max(sum(blocks), 1)), dtype=dtype, device=grads[0].device)
    col = 0
    for g, nb in zip(grads, blocks):
        if nb and T:
            _sumsq_kernel[(T, nb)](g.contiguous(), partial, g.numel() // T, partial.shape[1], col,
                                   COMPUTE=tl_compute_dtype(g.dtype), BLOCK=BLOCK)
        col += nb
    norm = partial.sum(1).sqrt()
    factor = torch.clamp(max_norm / (norm + eps), max=1.0)
    factor = torch.where(torch.isfinite(norm), factor, torch.full_like(factor, float("nan")))
    return norm, factor
