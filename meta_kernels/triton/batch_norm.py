"""Triton batch norm with per-(task, channel) statistics: one program per (t, c) group of
x [T, N, C, S], looping over the group's N*S elements."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.tensor_utils import compute_dtype
from meta_kernels.triton._common import tl_compute_dtype

BLOCK = 1024


@triton.jit
def _group_offsets(start, g, N, C, S, M, BLOCK: tl.constexpr):
    t = g // C
    c = g % C
    m = start + tl.arange(0, BLOCK)
    n = m // S
    s = m % S
    return ((t * N + n) * C + c) * S + s, m < M


@triton.jit
def _bn_forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, N, C, S, eps,
                       COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    M = N * S
    acc = tl.zeros((BLOCK,), dtype=COMPUTE)
    for start in range(0, M, BLOCK):
        offs, mask = _group_offsets(start, g, N, C, S, M, BLOCK)
        acc += tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    mean = tl.sum(acc, axis=0) / M
    acc = tl.zeros((BLOCK,), dtype=COMPUTE)
    for start in range(0, M, BLOCK):
        offs, mask = _group_offsets(start, g, N, C, S, M, BLOCK)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / M + eps)
    tl.store(mean_ptr + g, mean)
    tl.store(rstd_ptr + g, rstd)
    scale = tl.load(w_ptr + g).to(COMPUTE) * rstd
    shift = tl.load(b_ptr + g).to(COMPUTE)
    for start in range(0, M, BLOCK):
        offs, mask = _group_offsets(start, g, N, C, S, M, BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + offs, ((x - mean) * scale + shift).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_backward_kernel(go_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, gmean_ptr, grstd_ptr, gx_ptr, gw_ptr, gb_ptr, N, C, S,
                        COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    M = N * S
    mean = tl.load(mean_ptr + g).to(COMPUTE)
    rstd = tl.load(rstd_ptr + g).to(COMPUTE)
    acc_go = tl.zeros((BLOCK,), dtype=COMPUTE)
    acc_go_xc = tl.zeros((BLOCK,), dtype=COMPUTE)
    for start in range(0, M, BLOCK):
        offs, mask = _group_offsets(start, g, N, C, S, M, BLOCK)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        acc_go += go
        acc_go_xc += tl.where(mask, go * (x - mean), 0.0)
    sum_go = tl.sum(acc_go, axis=0)
    sum_go_xc = tl.sum(acc_go_xc, axis=0)
    tl.store(gb_ptr + g, sum_go)
    tl.store(gw_ptr + g, sum_go_xc * rstd)
    # grad_x = w rstd (go - mean(go) - xhat mean(go xhat)) = a go - k (x - mean) - a mean(go); the
    # statistics' own gradients add grad_mean / M - grad_rstd rstd^3 (x - mean) / M.
    a = tl.load(w_ptr + g).to(COMPUTE) * rstd
    k = (a * sum_go_xc + tl.load(grstd_ptr + g).to(COMPUTE) * rstd) * rstd * rstd / M
    c0 = (a * sum_go - tl.load(gmean_ptr + g).to(COMPUTE)) / M
    for start in range(0, M, BLOCK):
        offs, mask = _group_offsets(start, g, N, C, S, M, BLOCK)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(gx_ptr + offs, (a * go - k * (x - mean) - c0).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_double_backward_kernel(ggx_ptr, ggw_ptr, ggb_ptr, go_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dgo_ptr, dx_ptr,
                               dw_ptr, dmean_ptr, drstd_ptr, N, C, S, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    M = N * S
    mean = tl.load(mean_ptr + g).to(COMPUTE)
    rstd = tl.load(rstd_ptr + g).to(COMPUTE)
    # One pass for the five sums (xc = x - mean, u = gg_x), one pass writing both outputs.
    acc_go = tl.zeros((BLOCK,), dtype=COMPUTE)
    acc_go_xc = tl.zeros((BLOCK,), dtype=COMPUTE)
    acc_u = tl.zeros((BLOCK,), dtype=COMPUTE)
    acc_u_xc = tl.zeros((BLOCK,), dtype=COMPUTE)
    acc_u_go = tl.zeros((BLOCK,), dtype=COMPUTE)
    for start in range(0, M, BLOCK):
        offs, mask = _group_offsets(start, g, N, C, S, M, BLOCK)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        u = tl.load(ggx_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        xc = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - mean, 0.0)
        acc_go += go
        acc_go_xc += go * xc
        acc_u += u
        acc_u_xc += u * xc
        acc_u_go += u * go
    s_go_xc = tl.sum(acc_go_xc, axis=0)
    s_u_xc = tl.sum(acc_u_xc, axis=0)
    B = tl.sum(acc_go, axis=0)
    U = tl.sum(acc_u, axis=0)
    W = s_go_xc * rstd
    V = s_u_xc * rstd
    w = tl.load(w_ptr + g).to(COMPUTE)
    a = w * rstd
    cb = tl.load(ggb_ptr + g).to(COMPUTE) - a * U / M
    cw = tl.load(ggw_ptr + g).to(COMPUTE) - a * V / M
    d_a = tl.sum(acc_u_go, axis=0) - (B * U + W * V) / M
    k = a * W / M
    tl.store(dw_ptr + g, rstd * d_a)
    tl.store(dmean_ptr + g, -rstd * (cw * B - k * U))
    tl.store(drstd_ptr + g, w * d_a + cw * s_go_xc - k * s_u_xc)
    # d_grad_out = cb + xhat cw + a u; d_x = rstd (cw go - k u)
    rcw = rstd * cw
    rk = rstd * k
    for start in range(0, M, BLOCK):
        offs, mask = _group_offsets(start, g, N, C, S, M, BLOCK)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        u = tl.load(ggx_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(dgo_ptr + offs, (cb + (x - mean) * rcw + a * u).to(dgo_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + offs, (rcw * go - rk * u).to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(x: Tensor) -> tuple[int, int, int, int]:
    T, N, C = x.shape[0], x.shape[1], x.shape[2]
    return T, N, C, (x.numel() // (T * N * C)) if T * N * C else 0


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    T, N, C, S = _geometry(x)
    x = x.contiguous()
    stat = compute_dtype(x.dtype)
    out = torch.empty_like(x)
    mean = torch.empty((T, C), dtype=stat, device=x.device)
    rstd = torch.empty((T, C), dtype=stat, device=x.device)
    if T * C:
        _bn_forward_kernel[(T * C,)](x, weight.to(stat).contiguous(), bias.to(stat).contiguous(), out, mean, rstd,
                                     N, C, S, eps, COMPUTE=tl_compute_dtype(x.dtype), BLOCK=BLOCK)
    return out, mean, rstd


def batch_norm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        grad_mean: Tensor | None = None, grad_rstd: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    T, N, C, S = _geometry(x)
    x = x.contiguous()
    stat = compute_dtype(x.dtype)
    gx = torch.empty_like(x)
    gw = torch.empty((T, C), dtype=stat, device=x.device)
    gb = torch.empty((T, C), dtype=stat, device=x.device)
    stat_grad = lambda t: torch.zeros((T, C), dtype=stat, device=x.device) if t is None else t.to(stat).contiguous()
    if T * C:
        _bn_backward_kernel[(T * C,)](grad_out.to(x.dtype).contiguous(), x, weight.to(stat).contiguous(),
                                      mean.to(stat).contiguous(), rstd.to(stat).contiguous(), stat_grad(grad_mean),
                                      stat_grad(grad_rstd), gx, gw, gb, N, C, S,
                                      COMPUTE=tl_compute_dtype(x.dtype), BLOCK=BLOCK)
    return gx, gw.to(weight.dtype), gb.to(weight.dtype)


def batch_norm_double_backward(gg_x: Tensor, gg_w: Tensor, gg_b: Tensor, grad_out: Tensor, x: Tensor, weight: Tensor,
                               mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, N, C, S = _geometry(x)
    x = x.contiguous()
    stat = compute_dtype(x.dtype)
    d_go, d_x = torch.empty_like(x), torch.empty_like(x)
    d_w, d_mean, d_rstd = (torch.empty((T, C), dtype=stat, device=x.device) for _ in range(3))
    if T * C:
        _bn_double_backward_kernel[(T * C,)](
            gg_x.to(x.dtype).contiguous(), gg_w.to(stat).contiguous(), gg_b.to(stat).contiguous(),
            grad_out.to(x.dtype).contiguous(), x, weight.to(stat).contiguous(), mean.to(stat).contiguous(),
            rstd.to(stat).contiguous(), d_go, d_x, d_w, d_mean, d_rstd, N, C, S,
            COMPUTE=tl_compute_dtype(x.dtype), BLOCK=BLOCK)
    return d_go, d_x, d_w.to(weight.dtype), d_mean.to(mean.dtype), d_rstd.to(rstd.dtype)
