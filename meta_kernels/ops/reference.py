"""Pure-PyTorch reference implementations of every op: the ground truth the kernels are tested
against, and the fallback backend. Differentiable to any order by ordinary autograd.
Half/bfloat16 inputs are computed in float32 and stored back, as the kernels do."""
from __future__ import annotations

import torch
from torch import Tensor

from meta_kernels.tensor_utils import task_view, to_compute


def sgd_step(params: list[Tensor], grads: list[Tensor], lrs: Tensor, scale: Tensor | None) -> list[Tensor]:
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        coef = lrs[i].to(to_compute(p).dtype)
        if scale is not None:
            coef = coef * task_view(scale.to(to_compute(p).dtype), p)
        out.append((to_compute(p) - coef * to_compute(g)).to(p.dtype))
    return out


def scaled_grad(g: Tensor, scale: Tensor | None) -> Tensor:
    """The gradient in compute precision, times the per-task factor."""
    g = to_compute(g)
    return g if scale is None else task_view(scale.to(g.dtype), g) * g


def step_rate(lrs: Tensor, i: int, rates: list[Tensor] | None, like: Tensor) -> Tensor:
    """Tensor i's rate: lrs[i], times its per-element rates (Meta-SGD) when given."""
    lr = lrs[i].to(like.dtype)
    return lr if rates is None else lr * to_compute(rates[i])


def momentum_step(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lrs: Tensor, scale: Tensor | None,
                  rates: list[Tensor] | None, momentum: float) -> tuple[list[Tensor], list[Tensor]]:
    """Heavy-ball momentum as torch.optim.SGD (no dampening): b' = momentum * b + s * g,
    phi = theta - lr * b'."""
    new_p, new_b = [], []
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        b_new = momentum * to_compute(b) + scaled_grad(g, scale)
        new_p.append((to_compute(p) - step_rate(lrs, i, rates, b_new) * b_new).to(p.dtype))
        new_b.append(b_new.to(b.dtype))
    return new_p, new_b


class _SafeSqrt(torch.autograd.Function):
    """sqrt whose derivative is 0 where the input is 0 (not inf): Adam's second moment is exactly 0
    where every gradient so far was 0 (a dead ReLU), and there d sqrt would turn the meta-gradient
    into 0 * inf = NaN. The step is 0 there whatever v does, so 0 is the derivative's limit."""

    @staticmethod
    def forward(x):
        return x.sqrt()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (root,) = ctx.saved_tensors
        positive = root > 0
        return torch.where(positive, grad / (2 * torch.where(positive, root, torch.ones_like(root))),
                           torch.zeros_like(grad))


def safe_sqrt(x: Tensor) -> Tensor:
    return _SafeSqrt.apply(x)


def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], lrs: Tensor,
              scale: Tensor | None, rates: list[Tensor] | None, beta1: float, beta2: float, eps: float,
              step: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Adam as torch.optim.Adam (step counts from 1): m' = b1 m + (1 - b1) s g,
    v' = b2 v + (1 - b2) (s g)^2, phi = theta - lr * (m' / c1) / (sqrt(v' / c2) + eps) with
    c = 1 - b^step."""
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    new_p, new_m, new_v = [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        g = scaled_grad(g, scale)
        m_new = beta1 * to_compute(m) + (1 - beta1) * g
        v_new = beta2 * to_compute(v) + (1 - beta2) * g * g
        direction = (m_new / c1) / (safe_sqrt(v_new / c2) + eps)
        new_p.append((to_compute(p) - step_rate(lrs, i, rates, direction) * direction).to(p.dtype))
        new_m.append(m_new.to(m.dtype))
        new_v.append(v_new.to(v.dtype))
    return new_p, new_m, new_v


def clip_grad_norm(grads: list[Tensor], max_norm: float, eps: float) -> tuple[Tensor, Tensor]:
    sumsq = sum(to_compute(g).reshape(g.shape[0], -1).pow(2).sum(1) for g in grads)
    norm = sumsq.sqrt()
    return norm, clip_factor(norm, max_norm, eps)


def clip_factor(norm: Tensor, max_norm: float, eps: float) -> Tensor:
    """min(1, max_norm / (norm + eps)) per task; differentiable in norm."""
    factor = torch.clamp(max_norm / (norm + eps), max=1.0)
    # Non-finite norm -> NaN factor: the update is visibly poisoned rather than silently zeroed.
    return torch.where(torch.isfinite(norm), factor, torch.full_like(factor, float("nan")))


def bn_stat_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a [T, C] statistic against x [T, N, C, *spatial]."""
    return (x.shape[0], 1, x.shape[2]) + (1,) * (x.dim() - 3)


def bn_reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (1,) + tuple(range(3, x.dim()))


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    xm = to_compute(x)
    dims = bn_reduce_dims(x)
    mean = xm.mean(dim=dims)
    centred = xm - mean.reshape(bn_stat_shape(x))
    var = centred.pow(2).mean(dim=dims)
    rstd = torch.rsqrt(var + eps)
    w = (to_compute(weight) * rstd).reshape(bn_stat_shape(x))
    out = centred * w + to_compute(bias).reshape(bn_stat_shape(x))
    return out.to(x.dtype), mean, rstd


def batch_norm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        grad_mean: Tensor | None = None, grad_rstd: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of batch_norm's `out` with mean and rstd taken as given inputs; grad_mean /
    grad_rstd, gradients for the forward's mean and rstd outputs, add their path through the
    statistics (d mean/dx = 1/M, d rstd/dx = -rstd^3 (x - mean) / M) to grad_x."""
    go, xm = to_compute(grad_out), to_compute(x)
    dims = bn_reduce_dims(x)
    count = xm.numel() // (x.shape[0] * x.shape[2]) if x.numel() else 1
    xhat = (xm - mean.reshape(bn_stat_shape(x))) * rstd.reshape(bn_stat_shape(x))
    grad_bias = go.sum(dim=dims)
    grad_weight = (go * xhat).sum(dim=dims)
    a = (to_compute(weight) * rstd).reshape(bn_stat_shape(x))
    grad_x = a * (go - (grad_bias / count).reshape(bn_stat_shape(x)) - xhat * (grad_weight / count).reshape(bn_stat_shape(x)))
    if grad_mean is not None:
        grad_x = grad_x + (to_compute(grad_mean) / count).reshape(bn_stat_shape(x))
    if grad_rstd is not None:
        slope = -to_compute(grad_rstd) * rstd.to(go.dtype).pow(2) / count
        grad_x = grad_x + xhat * slope.reshape(bn_stat_shape(x))
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def reptile_update_(params: list[Tensor], adapted: list[Tensor], epsilon: float) -> None:
    with torch.no_grad():
        for p, a in zip(params, adapted):
            pm = to_compute(p)
            p.copy_((pm + epsilon * (to_compute(a).mean(0) - pm)).to(p.dtype))


def _windows(t: Tensor) -> Tensor:
    """[..., H, W] -> [..., H // 2, W // 2, 4]: each 2x2 window in the order (0,0), (0,1), (1,0), (1,1)."""
    Ho, Wo = t.shape[-2] // 2, t.shape[-1] // 2
    t = t[..., :2 * Ho, :2 * Wo].reshape(*t.shape[:-2], Ho, 2, Wo, 2)
    return t.transpose(-3, -2).reshape(*t.shape[:-4], Ho, Wo, 4)


def max_pool2x2_relu(x: Tensor) -> tuple[Tensor, Tensor]:
    """relu(max_pool2d(x, 2)) and the int8 position of each maximum in its window (-1 where the
    ReLU zeroes it). First maximum wins ties; NaN propagates."""
    m, at = _windows(to_compute(x)).max(-1)
    keep = (m > 0) | torch.isnan(m)
    out = torch.where(keep, m, torch.zeros_like(m))
    return out.to(x.dtype), torch.where(keep, at, torch.full_like(at, -1)).to(torch.int8)


def max_pool2x2_relu_backward(grad_out: Tensor, index: Tensor, height: int, width: int) -> Tensor:
    """grad_out routed to the recorded window positions, zeros elsewhere (x's shape [..., height, width])."""
    onehot = index.unsqueeze(-1) == torch.arange(4, device=index.device, dtype=index.dtype)
    win = torch.where(onehot, grad_out.unsqueeze(-1), torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
    Ho, Wo = grad_out.shape[-2], grad_out.shape[-1]
    grad = win.reshape(*grad_out.shape[:-2], Ho, Wo, 2, 2).transpose(-3, -2).reshape(*grad_out.shape[:-2], 2 * Ho, 2 * Wo)
    return torch.nn.functional.pad(grad, (0, width - 2 * Wo, 0, height - 2 * Ho))


def max_pool2x2_relu_gather(grad_x: Tensor, index: Tensor) -> Tensor:
    """The adjoint of max_pool2x2_relu_backward: each window's entry at the recorded position
    (zero where index is -1). Reads the four strided window corners in place: no window copy."""
    Ho, Wo = index.shape[-2], index.shape[-1]
    out = torch.zeros((), dtype=grad_x.dtype, device=grad_x.device)
    for q in range(4):
        corner = grad_x[..., q // 2:2 * Ho:2, q % 2:2 * Wo:2]
        out = torch.where(index == q, corner, out)
    return out


def conv3x3_bn_pool_relu(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, groups: int,
                         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """conv2d(x, weight, bias, padding=1, groups), batch norm with the batch statistics of each
    channel over (N, H, W), then max_pool2x2_relu: (out, index, mean, rstd)."""
    h = torch.nn.functional.conv2d(to_compute(x), to_compute(weight), None if bias is None else to_compute(bias), padding=1,
                                   groups=groups)
    y, mean, rstd = batch_norm(h.unsqueeze(0), gamma.unsqueeze(0), beta.unsqueeze(0), eps)
    out, index = max_pool2x2_relu(y.squeeze(0))
    return out.to(x.dtype), index, mean[0], rstd[0]
