"""Triton adam_step: torch.optim.Adam's update, u = scale[t] * g, m' = b1 m + (1 - b1) u,
v' = b2 v + (1 - b2) u^2, phi = theta - lrs[i] * rates * (m' / c1) / (sqrt(v' / c2) + eps), one
launch per tensor of the list."""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.triton._stateful import in_place, launch, out_of_place


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, p_out, m_out, v_out, lrs_ptr, scale_ptr, rates_ptr, lr_index, numel,
                 inner, beta1, beta2, eps, c1, c2, HAS_SCALE: tl.constexpr, HAS_RATES: tl.constexpr,
                 RATES_FULL: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    if HAS_SCALE:
        u = u * tl.load(scale_ptr + offs // inner, mask=mask, other=0.0).to(COMPUTE)
    m = beta1 * tl.load(m_ptr + offs, mask=mask).to(COMPUTE) + (1 - beta1) * u
    v = beta2 * tl.load(v_ptr + offs, mask=mask).to(COMPUTE) + (1 - beta2) * u * u
    direction = (m / c1) / (tl.sqrt(v / c2) + eps)
    rate = tl.load(lrs_ptr + lr_index).to(COMPUTE)
    if HAS_RATES:
        rate = rate * tl.load(rates_ptr + (offs if RATES_FULL else offs % inner), mask=mask, other=0.0).to(COMPUTE)
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    tl.store(p_out + offs, (p - rate * direction).to(p_out.dtype.element_ty), mask=mask)
    tl.store(m_out + offs, m.to(m_out.dtype.element_ty), mask=mask)
    tl.store(v_out + offs, v.to(v_out.dtype.element_ty), mask=mask)


def _run(lrs, scale, rates, beta1, beta2, eps, step):
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    return lambda ins, outs: launch(_adam_kernel, ins, outs, lrs, scale, rates, beta1, beta2, eps, c1, c2)


def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              lrs: Tensor, scale: Tensor | None, rates: list[Tensor] | None, beta1: float, beta2: float, eps: float,
              step: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    return out_of_place([params, grads, exp_avgs, exp_avg_sqs], _run(lrs, scale, rates, beta1, beta2, eps, step))


def adam_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               lrs: Tensor, scale: Tensor | None, rates: list[Tensor] | None, beta1: float, beta2: float, eps: float,
               step: int) -> None:
    in_place([params, grads, exp_avgs, exp_avg_sqs], _run(lrs, scale, rates, beta1, beta2, eps, step))
