"""Triton momentum_step: b' = mu * b + scale[t] * g, phi = theta - lrs[i] * rates * b', one launch
per tensor of the list."""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.triton._stateful import in_place, launch, out_of_place


@triton.jit
def _momentum_kernel(p_ptr, g_ptr, b_ptr, p_out, b_out, lrs_ptr, scale_ptr, rates_ptr, lr_index, numel, inner,
                     momentum, HAS_SCALE: tl.constexpr, HAS_RATES: tl.constexpr, RATES_FULL: tl.constexpr,
                     COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    if HAS_SCALE:
        u = u * tl.load(scale_ptr + offs // inner, mask=mask, other=0.0).to(COMPUTE)
    buf = momentum * tl.load(b_ptr + offs, mask=mask).to(COMPUTE) + u
    rate = tl.load(lrs_ptr + lr_index).to(COMPUTE)
    if HAS_RATES:
        rate = rate * tl.load(rates_ptr + (offs if RATES_FULL else offs % inner), mask=mask, other=0.0).to(COMPUTE)
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    tl.store(p_out + offs, (p - rate * buf).to(p_out.dtype.element_ty), mask=mask)
    tl.store(b_out + offs, buf.to(b_out.dtype.element_ty), mask=mask)


def momentum_step(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lrs: Tensor, scale: Tensor | None,
                  rates: list[Tensor] | None, momentum: float) -> tuple[list[Tensor], list[Tensor]]:
    return out_of_place([params, grads, bufs],
                        lambda ins, outs: launch(_momentum_kernel, ins, outs, lrs, scale, rates, momentum))


def momentum_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lrs: Tensor, scale: Tensor | None,
                   rates: list[Tensor] | None, momentum: float) -> None:
    in_place([params, grads, bufs], lambda ins, outs: launch(_momentum_kernel, ins, outs, lrs, scale, rates, momentum))
