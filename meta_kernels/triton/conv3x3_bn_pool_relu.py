"""Triton conv3x3_bn_pool_relu (Conv4's input block) and the pieces of its backward, with the
schemas and results of the C++ ops (csrc/ops.cpp): the batch-norm statistics from the 3x3-patch
moments of x, the conv computed at each pooled window's four positions, and the backward's patch
sums over the kept maxima with their adjoint, the patch gather. A patch entry k = (c_in, dh, dw)
of position (h, w) reads x[n, g * C_in + c_in, h + dh - 1, w + dw - 1], zero outside the image."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from meta_kernels.triton._common import NAMESPACE, compute_dtype

BLOCK = 128


@triton.jit
def _patch_offsets(n, g, h, w, k, CIN: tl.constexpr, C_TOTAL, H, W):
    """Offsets and in-image mask of patch entries k at positions (h, w) (broadcast together)."""
    ci = k // 9
    hh = h + (k % 9) // 3 - 1
    ww = w + k % 3 - 1
    inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    return ((n * C_TOTAL + g * CIN + ci) * H + hh) * W + ww, inside


@triton.jit
def _moments_kernel(x_ptr, sums_ptr, gram_ptr, N, C_TOTAL, H, W, CIN: tl.constexpr, K: tl.constexpr,
                    KP: tl.constexpr, BLOCK: tl.constexpr):
    """Per group: the sums of the patch entries [K] and of their products [K, K] over all positions, in float64."""
    g = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    total = N * H * W
    s = tl.zeros((KP,), dtype=tl.float64)
    gram = tl.zeros((KP, KP), dtype=tl.float64)
    for start in range(0, total, BLOCK):
        p = start + tl.arange(0, BLOCK)
        n, h, w = p // (H * W), (p // W) % H, p % W
        offs, inside = _patch_offsets(n[:, None], g, h[:, None], w[:, None], k[None, :], CIN, C_TOTAL, H, W)
        valid = inside & (p[:, None] < total) & (k[None, :] < K)
        v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float64)  # [BLOCK, KP]
        s += tl.sum(v, axis=0)
        gram += tl.sum(v[:, :, None] * v[:, None, :], axis=0)
    tl.store(sums_ptr + g * KP + k, s)
    tl.store(gram_ptr + g * KP * KP + k[:, None] * KP + k[None, :], gram)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, centre_ptr, scale_ptr, shift_ptr, out_ptr, index_ptr, C_OUT, C_TOTAL, OC, H, W,
                    Ho, Wo, CIN: tl.constexpr, K: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """One lane per pooled window of plane (n, o): the conv at its four positions, normalised, pooled."""
    plane = tl.program_id(0).to(tl.int64)
    n, o = plane // OC, plane % OC
    g = o // C_OUT
    q = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < Ho * Wo
    i, j = q // Wo, q % Wo
    centre = tl.load(centre_ptr + o).to(COMPUTE)
    scale = tl.load(scale_ptr + o).to(COMPUTE)
    shift = tl.load(shift_ptr + o).to(COMPUTE)
    m = tl.zeros((BLOCK,), dtype=COMPUTE)
    at = tl.zeros((BLOCK,), dtype=tl.int32)
    for corner in tl.static_range(4):
        h = 2 * i + corner // 2
        w = 2 * j + corner % 2
        acc = tl.zeros((BLOCK,), dtype=COMPUTE)
        for k in tl.static_range(K):
            offs, inside = _patch_offsets(n, g, h, w, k, CIN, C_TOTAL, H, W)
            acc += tl.load(w_ptr + o * K + k).to(COMPUTE) * tl.load(x_ptr + offs, mask=mask & inside, other=0.0).to(COMPUTE)
        y = (acc - centre) * scale + shift
        if corner == 0:
            m = y
        else:
            # First maximum wins ties; a NaN wins and propagates (as max_pool2d and relu do).
            take = (y > m) | ((y != y) & (m == m))
            m = tl.where(take, y, m)
            at = tl.where(take, corner, at)
    keep = (m > 0) | (m != m)
    tl.store(out_ptr + plane * Ho * Wo + q, tl.where(keep, m, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(index_ptr + plane * Ho * Wo + q, tl.where(keep, at, -1).to(tl.int8), mask=mask)


@triton.jit
def _kept_patches(x_ptr, pbar_ptr, index_ptr, plane, n, g, q, mask, C_TOTAL, H, W, Wo, CIN: tl.constexpr,
                  K: tl.constexpr, KP: tl.constexpr):
    """Centred patches [BLOCK, KP] at the kept maxima of windows q of a plane (0 elsewhere), and the kept mask."""
    k = tl.arange(0, KP)
    at = tl.load(index_ptr + plane * (H // 2) * Wo + q, mask=mask, other=-1).to(tl.int32)
    kept = mask & (at >= 0)
    h = 2 * (q // Wo) + tl.maximum(at, 0) // 2
    w = 2 * (q % Wo) + tl.maximum(at, 0) % 2
    offs, inside = _patch_offsets(n, g, h[:, None], w[:, None], k[None, :], CIN, C_TOTAL, H, W)
    valid = kept[:, None] & (k[None, :] < K)
    v = tl.load(x_ptr + offs, mask=valid & inside, other=0.0).to(tl.float64)
    pbar = tl.load(pbar_ptr + g * K + k, mask=k < K, other=0.0)
    return tl.where(valid, v - pbar[None, :], 0.0), kept


@triton.jit
def _patch_sums_kernel(go_ptr, index_ptr, x_ptr, pbar_ptr, sum_pc_ptr, sum_g_ptr, N, C_OUT, C_TOTAL, OC, H, W, Wo,
                       CIN: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    """One program per output channel o: sum(g * pc) [K] and sum(g) over the kept maxima of all samples."""
    o = tl.program_id(0).to(tl.int64)
    g = o // C_OUT
    k = tl.arange(0, KP)
    windows = (H // 2) * Wo
    acc = tl.zeros((KP,), dtype=tl.float64)
    acc_g = tl.zeros((BLOCK,), dtype=tl.float64)
    for n in range(0, N):
        plane = n * OC + o
        for start in range(0, windows, BLOCK):
            q = start + tl.arange(0, BLOCK)
            mask = q < windows
            pc, kept = _kept_patches(x_ptr, pbar_ptr, index_ptr, plane, n, g, q, mask, C_TOTAL, H, W, Wo, CIN, K, KP)
            gy = tl.where(kept, tl.load(go_ptr + plane * windows + q, mask=mask, other=0.0).to(tl.float64), 0.0)
            acc += tl.sum(gy[:, None] * pc, axis=0)
            acc_g += gy
    tl.store(sum_pc_ptr + o * K + k, acc, mask=k < K)
    tl.store(sum_g_ptr + o, tl.sum(acc_g, axis=0))


@triton.jit
def _patch_gather_kernel(u_ptr, c_ptr, index_ptr, x_ptr, pbar_ptr, out_ptr, C_OUT, C_TOTAL, OC, H, W, Wo,
                         CIN: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    """One lane per window of plane (n, o): u[o] . pc + c[o] at its kept maximum, 0 where dropped."""
    plane = tl.program_id(0).to(tl.int64)
    n, o = plane // OC, plane % OC
    g = o // C_OUT
    k = tl.arange(0, KP)
    windows = (H // 2) * Wo
    q = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < windows
    pc, kept = _kept_patches(x_ptr, pbar_ptr, index_ptr, plane, n, g, q, mask, C_TOTAL, H, W, Wo, CIN, K, KP)
    u = tl.load(u_ptr + o * K + k, mask=k < K, other=0.0).to(tl.float64)
    v = tl.sum(pc * u[None, :], axis=1) + tl.load(c_ptr + o).to(tl.float64)
    tl.store(out_ptr + plane * windows + q, tl.where(kept, v, 0.0).to(out_ptr.dtype.element_ty), mask=mask)


def _sizes(x: Tensor, groups: int):
    cin = x.shape[1] // groups
    K = 9 * cin
    return cin, K, triton.next_power_of_2(K)


@torch.library.custom_op(f"{NAMESPACE}::conv3x3_bn_pool_relu_moments", mutates_args=())
def conv3x3_bn_pool_relu_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    x = x.contiguous()
    cin, K, KP = _sizes(x, groups)
    N, C_total, H, W = x.shape
    sums = torch.empty((groups, KP), dtype=torch.float64, device=x.device)
    gram = torch.empty((groups, KP, KP), dtype=torch.float64, device=x.device)
    # A [BLOCK, KP, KP] product per step: fewer positions per step for wider patches.
    block = max(1, min(64, 4096 // (KP * KP)))
    _moments_kernel[(groups,)](x, sums, gram, N, C_total, H, W, CIN=cin, K=K, KP=KP, BLOCK=block)
    count = N * H * W
    sums, gram = sums[:, :K], gram[:, :K, :K]
    return sums / count, gram - sums.unsqueeze(2) * sums.unsqueeze(1) / count


@torch.library.custom_op(f"{NAMESPACE}::conv3x3_bn_pool_relu", mutates_args=())
def conv3x3_bn_pool_relu(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, groups: int,
                         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = x.contiguous()
    cin, K, _ = _sizes(x, groups)
    N, C_total, H, W = x.shape
    OC = weight.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    pbar, gram = conv3x3_bn_pool_relu_moments(x, groups)
    w = weight.reshape(OC, K).double()
    centre = (w * pbar.repeat_interleave(OC // groups, 0)).sum(1)
    var = (w * torch.bmm(gram.repeat_interleave(OC // groups, 0), w.unsqueeze(-1)).squeeze(-1)).sum(1) / (N * H * W)
    rstd = torch.rsqrt(var.clamp(min=0) + eps)
    mean = centre + (0 if bias is None else bias.double())
    scale = gamma.double() * rstd
    out = torch.empty((N, OC, H // 2, W // 2), dtype=x.dtype, device=x.device)
    index = torch.empty(out.shape, dtype=torch.int8, device=x.device)
    if out.numel():
        grid = (N * OC, triton.cdiv((H // 2) * (W // 2), BLOCK))
        _forward_kernel[grid](x, w.to(stat_dtype), centre.to(stat_dtype), scale.to(stat_dtype),
                              beta.to(stat_dtype).contiguous(), out, index, OC // groups, C_total, OC, H, W, H // 2,
                              W // 2, CIN=cin, K=K, COMPUTE=compute_dtype(x.dtype), BLOCK=BLOCK)
    return out, index, mean.to(stat_dtype), rstd.to(stat_dtype)


@torch.library.custom_op(f"{NAMESPACE}::conv3x3_bn_pool_relu_patch_sums", mutates_args=())
def conv3x3_bn_pool_relu_patch_sums(grad_out: Tensor, index: Tensor, x: Tensor, pbar: Tensor,
                                    groups: int) -> tuple[Tensor, Tensor]:
    x, grad_out, index, pbar = x.contiguous(), grad_out.contiguous(), index.contiguous(), pbar.double().contiguous()
    cin, K, KP = _sizes(x, groups)
    N, C_total, H, W = x.shape
    OC = grad_out.shape[1]
    sum_pc = torch.empty((OC, K), dtype=torch.float64, device=x.device)
    sum_g = torch.empty((OC,), dtype=torch.float64, device=x.device)
    _patch_sums_kernel[(OC,)](grad_out, index, x, pbar, sum_pc, sum_g, N, OC // groups, C_total, OC, H, W, W // 2,
                              CIN=cin, K=K, KP=KP, BLOCK=BLOCK)
    return sum_pc, sum_g


@torch.library.custom_op(f"{NAMESPACE}::conv3x3_bn_pool_relu_patch_gather", mutates_args=())
def conv3x3_bn_pool_relu_patch_gather(u: Tensor, c: Tensor, index: Tensor, x: Tensor, pbar: Tensor,
                                      groups: int) -> Tensor:
    x, index, pbar = x.contiguous(), index.contiguous(), pbar.double().contiguous()
    cin, K, KP = _sizes(x, groups)
    N, C_total, H, W = x.shape
    OC = index.shape[1]
    out = torch.empty(index.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        grid = (N * OC, triton.cdiv((H // 2) * (W // 2), BLOCK))
        _patch_gather_kernel[grid](u.double().contiguous(), c.double().contiguous(), index, x, pbar, out,
                                   OC // groups, C_total, OC, H, W, W // 2, CIN=cin, K=K, KP=KP, BLOCK=BLOCK)
    return out
