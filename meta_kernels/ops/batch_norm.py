"""batch_norm: training-mode batch norm with statistics per (task, channel) of x [T, N, C, *],
its fused backward and fused double backward (second-order MAML through BN; where that result is
differentiated again, the same closed form in differentiable torch ops).
Checks, fake kernels, autograd and the front-end; kernels in csrc/cpu/batch_norm.cpp,
csrc/cuda/batch_norm.cu and meta_kernels/triton/batch_norm.py."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, reference
from meta_kernels.ops.reference import bn_reduce_dims, bn_stat_shape
from meta_kernels.tensor_utils import compute_dtype, to_compute


# ---- checks ----------------------------------------------------------------------------------

def _check_x_weight(x: Tensor, weight: Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"x must be [T, N, C, *spatial], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    T, C = x.shape[0], x.shape[2]
    if weight.dim() != 2 or tuple(weight.shape) != (T, C):
        raise ValueError(f"weight must be [T, C] = [{T}, {C}] for x of shape {list(x.shape)}, got {list(weight.shape)}")
    _checks.same_device(weight, "weight", x, "x")


def check_args(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    _check_x_weight(x, weight)
    if bias.shape != weight.shape:
        raise ValueError(f"bias must have the shape of weight {list(weight.shape)}, got {list(bias.shape)}")
    _checks.same_device(bias, "bias", x, "x")


def check_backward_args(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        grad_mean: Tensor | None = None, grad_rstd: Tensor | None = None) -> None:
    _check_x_weight(x, weight)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have the shape of x {list(x.shape)}, got {list(grad_out.shape)}")
    if mean.shape != weight.shape or rstd.shape != weight.shape:
        raise ValueError(f"mean and rstd must be [T, C] like weight {list(weight.shape)}, "
                         f"got {list(mean.shape)} and {list(rstd.shape)}")
    for name, t in (("grad_mean", grad_mean), ("grad_rstd", grad_rstd)):
        if t is not None and t.shape != weight.shape:
            raise ValueError(f"{name} must be [T, C] like weight {list(weight.shape)}, got {list(t.shape)}")
    for name, t in (("grad_out", grad_out), ("mean", mean), ("rstd", rstd), ("grad_mean", grad_mean),
                    ("grad_rstd", grad_rstd)):
        if t is not None:
            _checks.same_device(t, name, x, "x")


# ---- fake kernels ----------------------------------------------------------------------------

def _fake(x, weight, bias, eps):
    check_args(x, weight, bias)
    stats = x.new_empty((x.shape[0], x.shape[2]), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _fake_backward(grad_out, x, weight, mean, rstd, grad_mean=None, grad_rstd=None):
    check_backward_args(grad_out, x, weight, mean, rstd, grad_mean, grad_rstd)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _fake_double_backward(gg_x, gg_w, gg_b, grad_out, x, weight, mean, rstd):
    check_backward_args(grad_out, x, weight, mean, rstd)
    _check_adjoints(gg_x, gg_w, gg_b, x, weight)
    like_x = lambda: torch.empty_like(x, memory_format=torch.contiguous_format)
    stat = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    return like_x(), like_x(), stat(weight), stat(mean), stat(rstd)


def _check_adjoints(gg_x, gg_w, gg_b, x, weight) -> None:
    if gg_x.shape != x.shape:
        raise ValueError(f"gg_x must have the shape of x {list(x.shape)}, got {list(gg_x.shape)}")
    for name, t in (("gg_w", gg_w), ("gg_b", gg_b)):
        if t.shape != weight.shape:
            raise ValueError(f"{name} must be [T, C] like weight {list(weight.shape)}, got {list(t.shape)}")
    for name, t in (("gg_x", gg_x), ("gg_w", gg_w), ("gg_b", gg_b)):
        _checks.same_device(t, name, x, "x")


# ---- autograd --------------------------------------------------------------------------------

def _autograd(ns):
    """Autograd for `ns.batch_norm`, whose backward is the fused `ns.batch_norm_backward`."""

    def setup(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_mean, grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if grad_out is not None:
            # The statistics' own gradients (MAML's meta-gradient: from the double backward) join
            # grad_x inside the fused backward's pass.
            return (*ns.batch_norm_backward(grad_out, x, weight, mean, rstd, grad_mean, grad_rstd), None)
        if grad_mean is None and grad_rstd is None:
            return None, None, None, None
        # Only the statistics used: d mean/dx = 1/M, d rstd/dx = -rstd^3 (x - mean) / M.
        shape = bn_stat_shape(x)
        count = x.numel() // (x.shape[0] * x.shape[2])
        base = torch.zeros_like(mean) if grad_mean is None else grad_mean / count
        grad_x = base.reshape(shape).expand_as(x).to(x.dtype)
        if grad_rstd is not None:
            slope = (-grad_rstd * rstd.pow(3) / count).reshape(shape).to(x.dtype)
            grad_x = torch.addcmul(grad_x, slope, x - mean.reshape(shape).to(x.dtype))
        return grad_x.contiguous(), None, None, None

    return backward, setup


def double_backward(gg_x, gg_w, gg_b, grad_out, x, weight, mean, rstd, needs=(True,) * 5):
    """Gradients of S = <gg_x, grad_x> + <gg_w, grad_weight> + <gg_b, grad_bias>, the outputs of
    batch_norm_backward(grad_out, x, weight, mean, rstd), with respect to those five inputs
    (None adjoints count as zero; entries whose `needs` is False come back as None).

    Per (task, channel), with M elements, xh = (x - mean) * rstd, a = weight * rstd,
    B = sum(grad_out), W = sum(grad_out * xh), grad_x = a (grad_out - B/M - xh W/M):
      S = a <gg_x, grad_out> + B cb + W cw,  cb = gg_b - a U/M,  cw = gg_w - a V/M
    with U = sum(gg_x), V = sum(gg_x * xh). Written in closed form with differentiable torch ops:
    a few passes over the activations instead of autograd through the backward formula, and
    under create_graph the result is itself differentiable."""
    go, xm = to_compute(grad_out), to_compute(x)
    shape, dims = bn_stat_shape(x), bn_reduce_dims(x)
    count = x.numel() // (x.shape[0] * x.shape[2]) if x.numel() else 1
    ch = lambda v: v.reshape(shape)
    # Without create_graph nothing here is differentiated: update in place, so that at most three
    # activation-sized tensors live at once.
    inplace = not torch.is_grad_enabled()
    addcmul = lambda t, a, b: t.addcmul_(a, b) if inplace else torch.addcmul(t, a, b)
    w, r, mu = to_compute(weight), rstd.to(go.dtype), mean.to(go.dtype)
    a = w * r
    xh = (xm - ch(mu)) * ch(r)
    B, W = go.sum(dims), (go * xh).sum(dims)
    zero = torch.zeros_like(a)
    cb = zero if gg_b is None else to_compute(gg_b)
    cw = zero if gg_w is None else to_compute(gg_w)
    d_a, U, V = zero, zero, zero
    if gg_x is not None:
        u = to_compute(gg_x)
        U, V = u.sum(dims), (u * xh).sum(dims)
        cb, cw = cb - a * U / count, cw - a * V / count
        d_a = (u * go).sum(dims) - (B * U + W * V) / count
    d_go = d_x = d_w = d_mean = d_rstd = None
    if needs[0]:
        d_go = torch.addcmul(ch(cb), xh, ch(cw))
        if gg_x is not None:
            d_go = addcmul(d_go, ch(a), u)
        d_go = d_go.to(grad_out.dtype)
    del xh
    # d S / d xh = go cw - (a W / M) u; its sums against 1 and xh follow from B, W, U, V.
    k = a * W / count
    if needs[1]:
        d_xh = go * ch(cw)
        if gg_x is not None:
            d_xh = addcmul(d_xh, ch(-k), u)
        d_x = (d_xh.mul_(ch(r)) if inplace else d_xh * ch(r)).to(x.dtype)
    if needs[3]:
        d_mean = (-r * (cw * B - k * U)).to(mean.dtype)
    if needs[2]:
        d_w = (r * d_a).to(weight.dtype)
    if needs[4]:  # rstd enters through a and through xh (d xh / d rstd = xh / rstd)
        d_rstd = (w * d_a + (cw * W - k * V) / r).to(rstd.dtype)
    return d_go, d_x, d_w, d_mean, d_rstd


def _backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _statistics_term_grads(gg_x, x, mean, rstd, grad_mean, grad_rstd):
    """Gradients of <gg_x, E>, E = grad_mean / M - grad_rstd rstd^3 (x - mean) / M (the part of
    batch_norm_backward's grad_x that grad_mean / grad_rstd add), with respect to x, mean, rstd,
    grad_mean and grad_rstd, in differentiable torch ops."""
    shape, dims = bn_stat_shape(x), bn_reduce_dims(x)
    count = x.numel() // (x.shape[0] * x.shape[2]) if x.numel() else 1
    u = to_compute(gg_x)
    r = rstd.to(u.dtype)
    U, V = u.sum(dims), (u * (to_compute(x) - mean.to(u.dtype).reshape(shape))).sum(dims)
    g_r = torch.zeros_like(r) if grad_rstd is None else to_compute(grad_rstd)
    beta = -g_r * r.pow(3) / count
    d_x = (u * beta.reshape(shape)).to(x.dtype)
    d_mean, d_rstd = (-beta * U).to(mean.dtype), (-3 * g_r * r.pow(2) / count * V).to(rstd.dtype)
    return d_x, d_mean, d_rstd, U / count, -r.pow(3) / count * V


def _backward_autograd(ns):
    """Autograd for `ns.batch_norm_backward`: the fused `ns.batch_norm_double_backward` (two passes
    over the activations) when nothing differentiates the result again, else the closed form in
    differentiable torch ops (third order, or no adjoint for grad_x); grad_mean / grad_rstd's part
    of grad_x in torch ops (only a third-order gradient meets it)."""

    def backward(ctx, gg_x, gg_w, gg_b):
        go, x, weight, mean, rstd, grad_mean, grad_rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if gg_x is None or torch.is_grad_enabled():
            grads = double_backward(gg_x, gg_w, gg_b, go, x, weight, mean, rstd, needs=needs[:5])
        else:
            gg_w = weight.new_zeros(weight.shape) if gg_w is None else gg_w
            gg_b = weight.new_zeros(weight.shape) if gg_b is None else gg_b
            d_go, *rest = ns.batch_norm_double_backward(gg_x, gg_w, gg_b, go, x, weight, mean, rstd)
            grads = tuple(d if need else None for d, need in zip((d_go.to(go.dtype), *rest), needs))
        if gg_x is None or (grad_mean is None and grad_rstd is None):
            return (*grads, None, None)
        d_x, d_mean, d_rstd, d_gm, d_gr = _statistics_term_grads(gg_x, x, mean, rstd, grad_mean, grad_rstd)
        plus = lambda base, extra, need: None if not need else extra if base is None else base + extra
        return (grads[0], plus(grads[1], d_x, needs[1]), grads[2], plus(grads[3], d_mean, needs[3]),
                plus(grads[4], d_rstd, needs[4]), d_gm.to(grad_mean.dtype) if needs[5] else None,
                d_gr.to(grad_rstd.dtype) if needs[6] else None)

    return backward, _backward_setup


# ---- front-end -------------------------------------------------------------------------------

def batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
               running_mean: Tensor | None = None, running_var: Tensor | None = None, momentum=0.1,
               backend: str | None = None, return_stats: bool = False):
    """Training-mode batch norm with statistics per (task, channel): x [T, N, C, *spatial].

    weight/bias are [T, C] (per task, e.g. adapted per task in the inner loop) or [C] (shared);
    None means no affine. If running_mean/running_var ([C], or [T, C] per task) are given they
    are updated in place with the batch statistics (unbiased variance), without a graph; a shared
    [C] set takes the tasks as T successive batches in task order (fold_running_stats), with
    `momentum` one value or one per task.

    As torch's F.batch_norm in training mode: a single value per channel and task (N times the
    spatial size equal to 1) is refused, and an empty batch gives an empty output and leaves the
    running statistics as they are. return_stats: (out, mean, unbiased variance), the statistics
    [T, C] detached (None for an empty batch)."""
    if x.dim() < 3:
        raise ValueError(f"x must be [T, N, C, *spatial], got shape {list(x.shape)}")
    check_scalars(eps, momentum)
    T, C = x.shape[0], x.shape[2]
    if x.shape[1] * math.prod(x.shape[3:]) == 1:
        raise ValueError(f"batch_norm needs more than 1 value per channel in training mode (N * spatial size, "
                         f"as torch's F.batch_norm), got x of shape {list(x.shape)} [T, N, C, *spatial]")
    weight = x.new_ones((T, C)) if weight is None else weight
    bias = x.new_zeros((T, C)) if bias is None else bias
    # Shared [C] affine: expand so autograd sums the per-task gradients back onto it.
    weight = weight.expand(T, C) if weight.dim() == 1 else weight
    bias = bias.expand(T, C) if bias.dim() == 1 else bias
    if x.numel() == 0:
        # No values: the kernels' statistics of nothing (NaN on some backends) must not reach the
        # running statistics. An empty output tied to weight and bias gives them zero gradients.
        check_args(x, weight, bias)
        shape = bn_stat_shape(x)
        out = torch.addcmul(bias.reshape(shape), x, weight.reshape(shape)).to(x.dtype)
        _update_running_stats(x, None, None, running_mean, running_var, momentum)
        return (out, None, None) if return_stats else out
    name = _backend.resolve(backend, x.device)
    op = reference.batch_norm if name == "reference" else _registry.namespace(name).batch_norm
    out, mean, rstd = _checks.checked_call(name, lambda: check_args(x, weight, bias),
                                           lambda: op(x, weight.contiguous(), bias.contiguous(), float(eps)))
    mean, var = _batch_stats(x, mean, rstd, eps)
    _update_running_stats(x, mean, var, running_mean, running_var, momentum)
    return (out, mean, var) if return_stats else out


def check_scalars(eps, momentum) -> None:
    # eps <= 0 divides by a zero variance (NaN out); momentum outside [0, 1] extrapolates.
    _checks.scalar(eps, "eps", "finite and > 0", lambda v: 0 < v < math.inf)
    for m in (momentum if isinstance(momentum, (list, tuple)) else [momentum]):
        _checks.scalar(m, "momentum", "in [0, 1]", lambda v: 0 <= v <= 1)


def _batch_stats(x: Tensor, mean: Tensor, rstd: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The batch's mean and unbiased variance per (task, channel), detached, from the kernel's mean and rstd."""
    count = x.numel() // (x.shape[0] * x.shape[2])
    with torch.no_grad():
        return mean.detach(), (rstd.detach().pow(-2) - eps) * (count / max(count - 1, 1))


def _update_running_stats(x, mean, var, running_mean, running_var, momentum) -> None:
    """Folds the batch statistics into the running ones; mean None (an empty batch) only checks
    their shapes, leaving them unchanged as torch does."""
    T, C = x.shape[0], x.shape[2]
    for running in (running_mean, running_var):
        if running is not None and tuple(running.shape) not in ((C,), (T, C)):
            raise ValueError(f"running statistics must be [C] or [T, C] = {[T, C]}, got {list(running.shape)}")
    if mean is not None:
        fold_running_stats(running_mean, running_var, mean, var, momentum)


def fold_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                       momentum) -> None:
    """Folds per-task batch statistics mean / var ([T, C], var unbiased) into running statistics,
    in place and without a graph. Per-task running statistics ([T, C]) take each task's own; one
    shared set ([C]) takes the T tasks as T successive batches in task order -- what a per-task
    loop leaves (with momentum 1: the last task's statistics) -- `momentum` being one value, or one
    per task (a cumulative average's 1 / batches seen)."""
    T = mean.shape[0]
    momenta = [float(momentum)] * T if isinstance(momentum, (int, float)) else [float(m) for m in momentum]
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, var)):
            if running is None:
                continue
            batch = batch.to(running.dtype)
            if running.dim() == batch.dim():
                running.mul_(1 - momenta[0]).add_(batch, alpha=momenta[0])
                continue
            # r_T = prod_t (1 - m_t) r_0 + sum_t m_t prod_{s > t} (1 - m_s) b_t
            weights, keep = [], 1.0
            for m in reversed(momenta):
                weights.append(m * keep)
                keep *= 1 - m
            weights = torch.tensor(weights[::-1], dtype=running.dtype, device=running.device)
            running.mul_(keep).add_((weights.unsqueeze(1) * batch).sum(0))


# ---- samples for opcheck and the self-check --------------------------------------------------

def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()
    x, w, b = rnd(2, 3, 4, 5, 5), rnd(2, 4), rnd(2, 4)
    _, mean, rstd = reference.batch_norm(x.detach(), w.detach(), b.detach(), 1e-5)
    plain = lambda *s: torch.randn(*s, generator=g).to(device)
    return [("batch_norm", (x, w, b, 1e-5)),
            ("batch_norm_backward", (rnd(*x.shape), x, w, mean.requires_grad_(), rstd.requires_grad_())),
            ("batch_norm_backward", (rnd(*x.shape), x, w, mean, rstd, rnd(2, 4), rnd(2, 4))),
            ("batch_norm_double_backward", (plain(*x.shape), plain(2, 4), plain(2, 4), plain(*x.shape), x.detach(),
                                            w.detach(), mean.detach(), rstd.detach()))]


def _selfcheck(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    x, w, b = rnd(2, 5, 3, 6, 6), rnd(2, 3), rnd(2, 3)
    out, ref_out = batch_norm(x, w, b, backend=backend), reference.batch_norm(x, w, b, 1e-5)[0]
    torch.testing.assert_close(out, ref_out)
    got = torch.autograd.grad((out * out.detach().sin()).sum(), (x, w, b))
    want = torch.autograd.grad((ref_out * ref_out.detach().sin()).sum(), (x, w, b))
    torch.testing.assert_close(got, want)


OP = _registry.add(_registry.OpDef(
    name="batch_norm",
    kernels=(_registry.Kernel("batch_norm",
                              "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)",
                              _fake, _autograd),
             _registry.Kernel("batch_norm_backward",
                              "(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, "
                              "Tensor? grad_mean=None, Tensor? grad_rstd=None) -> "
                              "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
                              _fake_backward, _backward_autograd),
             # Not differentiable itself: used only where no graph is built (see _backward_autograd).
             _registry.Kernel("batch_norm_double_backward",
                              "(Tensor gg_x, Tensor gg_w, Tensor gg_b, Tensor grad_out, Tensor x, Tensor weight, "
                              "Tensor mean, Tensor rstd) -> (Tensor d_grad_out, Tensor d_x, Tensor d_weight, "
                              "Tensor d_mean, Tensor d_rstd)",
                              _fake_double_backward)),
    backends=_backend.CONCRETE, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck, triton_module="batch_norm"))
