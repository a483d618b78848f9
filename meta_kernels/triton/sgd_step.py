"""Triton sgd_step: phi = theta - lrs[i] * scale[t] * g, one launch per tensor of the list."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.triton._common import tl_compute_dtype

BLOCK = 1024


@triton.jit
def _sgd_kernel(p_ptr, g_ptr, out_ptr, lrs_ptr, scale_ptr, lr_index, numel, inner,
                HAS_SCALE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    coef = tl.load(lrs_ptr + lr_index).to(COMPUTE)
    if HAS_SCALE:
        coef = coef * tl.load(scale_ptr + offs // inner, mask=mask, other=0.0).to(COMPUTE)
    tl.store(out_ptr + offs, (p - coef * g).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(params, grads, outs, lrs, scale) -> None:
    lrs = lrs.detach().contiguous()
    scale_c = scale.detach().contiguous() if scale is not None else lrs  # dummy pointer when unused
    for i, (p, g, out) in enumerate(zip(params, grads, outs)):
        numel = p.numel()
        if numel == 0:
            continue
        inner = numel // p.shape[0] if scale is not None else numel
        _sgd_kernel[(triton.cdiv(numel, BLOCK),)](
            p.contiguous(), g.contiguous(), out, lrs, scale_c, i, numel, inner,
            HAS_SCALE=scale is not None, COMPUTE=tl_compute_dtype(p.dtype), BLOCK=BLOCK)


def sgd_step(params: list[Tensor], grads: list[Tensor], lrs: Tensor, scale: Tensor | None) -> list[Tensor]:
    outs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
    _launch(params, grads, outs, lrs, scale)
    return outs


def sgd_step_(params: list[Tensor], grads: list[Tensor], lrs: Tensor, scale: Tensor | None) -> None:
    outs = [p if p.is_contiguous() else torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
    _launch(params, grads, outs, lrs, scale)
    for p, out in zip(params, outs):
        if out is not p:
            p.copy_(out)
