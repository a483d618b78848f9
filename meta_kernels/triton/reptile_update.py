"""Triton reptile_update_: theta += epsilon * (mean_t phi[t] - theta), in place, per tensor."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.triton._common import tl_compute_dtype

BLOCK = 1024


@triton.jit
def _reptile_kernel(theta_ptr, phi_ptr, numel, T, epsilon, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=COMPUTE)
    for t in range(0, T):
        acc += tl.load(phi_ptr + t * numel + offs, mask=mask, other=0.0).to(COMPUTE)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    theta = theta + epsilon * (acc / T - theta)
    tl.store(theta_ptr + offs, theta.to(theta_ptr.dtype.element_ty), mask=mask)


def reptile_update_(params: list[Tensor], adapted: list[Tensor], epsilon: float) -> None:
    for p, a in zip(params, adapted):
        numel = p.numel()
        if numel == 0:
            continue
        target = p if p.is_contiguous() else p.contiguous()
        _reptile_kernel[(triton.cdiv(numel, BLOCK),)](target, a.contiguous(), numel, a.shape[0], epsilon,
                                                      COMPUTE=tl_compute_dtype(p.dtype), BLOCK=BLOCK)
        if target is not p:
            p.copy_(target)
