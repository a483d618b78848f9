"""Fake kernels and autograd formulas shared by every custom-op namespace that implements the
op schemas (the compiled `meta_kernels` ops and the Triton `meta_kernels_triton` ops).

Backward formulas are written with differentiable torch ops (or with ops whose own backward
is), so double backward -- the second-order MAML meta-gradient -- flows through them."""
from __future__ import annotations

import torch

from meta_kernels.ops import _validate, reference


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- fake (meta) kernels: shapes and dtypes, after the same argument checks as the kernels --
# (a meta tensor among real ones dispatches here, so the checks must not be skipped)

def fake_sgd_step(params, grads, lrs, scale):
    _validate.sgd_args(params, grads, lrs, scale)
    return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


def fake_sgd_step_(params, grads, lrs, scale):
    _validate.sgd_args(params, grads, lrs, scale)


def fake_clip_grad_norm(grads, max_norm, eps):
    _validate.uniform_list(grads, "grads")
    _validate.leading_tasks(grads, "grads")
    dtype = _math_dtype(grads[0].dtype)
    T = grads[0].shape[0]
    return grads[0].new_empty((T,), dtype=dtype), grads[0].new_empty((T,), dtype=dtype)


def fake_batch_norm(x, weight, bias, eps):
    _validate.batch_norm_args(x, weight, bias)
    stats = x.new_empty((x.shape[0], x.shape[2]), dtype=_math_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def fake_batch_norm_backward(grad_out, x, weight, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def fake_reptile_update_(params, adapted, epsilon):
    _validate.reptile_args(params, adapted)


def fake_max_pool2x2_relu(x):
    _validate.max_pool2x2_relu_args(x)
    shape = (*x.shape[:-2], x.shape[-2] // 2, x.shape[-1] // 2)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8)


def fake_max_pool2x2_relu_backward(grad_out, index, height, width):
    _validate.max_pool2x2_relu_backward_args(grad_out, index, height, width)
    return grad_out.new_empty((*grad_out.shape[:-2], height, width))


def fake_max_pool2x2_relu_gather(grad_x, index):
    _validate.max_pool2x2_relu_gather_args(grad_x, index)
    return grad_x.new_empty(index.shape)


def fake_conv3x3_bn_pool_relu(x, weight, bias, gamma, beta, groups, eps):
    _validate.conv3x3_bn_pool_relu_args(x, weight, bias, gamma, beta, groups)
    shape = (x.shape[0], weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)
    stats = x.new_empty((weight.shape[0],), dtype=_math_dtype(x.dtype))
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8), stats, torch.empty_like(stats)


def fake_conv3x3_bn_pool_relu_moments(x, groups):
    _validate.patch_input_args(x, groups)
    K = 9 * (x.shape[1] // groups)
    return x.new_empty((groups, K), dtype=torch.float64), x.new_empty((groups, K, K), dtype=torch.float64)


def fake_conv3x3_bn_pool_relu_patch_sums(grad_out, index, x, pbar, groups):
    _validate.patch_pooled_args(grad_out, "grad_out", index, x, pbar, groups)
    return (x.new_empty((grad_out.shape[1], pbar.shape[1]), dtype=torch.float64),
            x.new_empty((grad_out.shape[1],), dtype=torch.float64))


def fake_conv3x3_bn_pool_relu_patch_gather(u, c, index, x, pbar, groups):
    _validate.patch_pooled_args(index, "index", index, x, pbar, groups)
    return x.new_empty(index.shape)


# ---- autograd ------------------------------------------------------------------------------

def _sgd_setup(ctx, inputs, output):
    params, grads, lrs, scale = inputs
    # The grads enter only the gradients of lrs and scale: with fixed rates and no clip factor in
    # the graph they are not kept (T copies of the parameters per inner step).
    ctx.kept = len(params) if lrs.requires_grad or (scale is not None and scale.requires_grad) else 0
    ctx.save_for_backward(*grads[:ctx.kept], lrs, scale)


def _sgd_backward(ctx, grad_outs):
    saved = ctx.saved_tensors
    grads, lrs, scale = saved[:ctx.kept], saved[ctx.kept], saved[ctx.kept + 1]
    need_p, need_g, need_lrs, need_scale = ctx.needs_input_grad
    grad_g, grad_lrs, grad_scale = None, None, None
    lr_items = lrs.unbind(0)
    if need_g:
        grad_g = []
        for go, lr in zip(grad_outs, lr_items):
            coef = -lr.to(go.dtype)
            if scale is not None:
                coef = coef * reference._task_view(scale.to(go.dtype), go)
            grad_g.append(coef * go)
    if need_lrs or need_scale:
        # <g, go> per tensor and task, reused by both the lrs and the scale gradients.
        inner = [(g * go).reshape(g.shape[0], -1).sum(1) if scale is not None else (g * go).sum()
                 for g, go in zip(grads, grad_outs)]
        if need_lrs:
            grad_lrs = -torch.stack([(d * scale.to(d.dtype)).sum() if scale is not None else d for d in inner])
            grad_lrs = grad_lrs.to(lrs.dtype)
        if need_scale:
            grad_scale = -sum(lr.to(d.dtype) * d for lr, d in zip(lr_items, inner)).to(scale.dtype)
    return (list(grad_outs) if need_p else None), grad_g, grad_lrs, grad_scale


def _clip_setup(ctx, inputs, output):
    grads, max_norm, eps = inputs
    ctx.n, ctx.max_norm, ctx.eps = len(grads), max_norm, eps
    ctx.save_for_backward(*grads, output[0])


def _clip_backward(ctx, grad_norm, grad_factor):
    saved = ctx.saved_tensors
    grads, norm = saved[:ctx.n], saved[ctx.n]
    denom = norm + ctx.eps
    clipped = torch.isfinite(norm) & (denom > ctx.max_norm)
    dfactor = torch.where(clipped, -ctx.max_norm / (denom * denom), torch.zeros_like(norm))
    dnorm = grad_norm + grad_factor * dfactor
    # d norm / d g = g / norm; zero where the norm is zero (subgradient, as torch.linalg.norm).
    coef = torch.where(norm > 0, dnorm / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return [(reference._task_view(coef, g) * g).to(g.dtype) for g in grads], None, None


def make_batch_norm_autograd(ns):
    """Autograd for `ns.batch_norm` whose backward is the fused `ns.batch_norm_backward`."""

    def setup(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_mean, grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if grad_out is None:
            grad_x, grad_w, grad_b = None, None, None
        else:
            grad_x, grad_w, grad_b = ns.batch_norm_backward(grad_out, x, weight, mean, rstd)
        if grad_mean is not None or grad_rstd is not None:
            # Direct use of the statistics: d mean/dx = 1/M, d rstd/dx = -rstd^3 (x - mean) / M.
            shape = reference._bn_shape(x)
            count = x.numel() // (x.shape[0] * x.shape[2])
            base = torch.zeros_like(mean) if grad_mean is None else grad_mean / count
            extra = base.reshape(shape).expand_as(x).to(x.dtype)
            if grad_rstd is not None:
                slope = (-grad_rstd * rstd.pow(3) / count).reshape(shape).to(x.dtype)
                extra = torch.addcmul(extra, slope, x - mean.reshape(shape).to(x.dtype))
            if grad_x is None:
                grad_x = extra.contiguous()
            elif torch.is_grad_enabled():
                grad_x = grad_x + extra
            else:  # the fused backward's fresh output: no graph, no other user
                grad_x.add_(extra)
        return grad_x, grad_w, grad_b, None

    return setup, backward


def _bn_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def batch_norm_double_backward(gg_x, gg_w, gg_b, grad_out, x, weight, mean, rstd, needs=(True,) * 5):
    """Gradients of S = <gg_x, grad_x> + <gg_w, grad_weight> + <gg_b, grad_bias>, the outputs of
    batch_norm_backward(grad_out, x, weight, mean, rstd), with respect to those five inputs
    (None adjoints count as zero; entries whose `needs` is False come back as None).

    Per (task, channel), with M elements, xh = (x - mean) * rstd, a = weight * rstd,
    B = sum(grad_out), W = sum(grad_out * xh), grad_x = a (grad_out - B/M - xh W/M):
      S = a <gg_x, grad_out> + B cb + W cw,  cb = gg_b - a U/M,  cw = gg_w - a V/M
    with U = sum(gg_x), V = sum(gg_x * xh). Written in closed form with differentiable torch ops:
    a few passes over the activations instead of autograd through the backward formula, and
    under create_graph the result is itself differentiable."""
    go, xm = reference._math(grad_out), reference._math(x)
    shape, dims = reference._bn_shape(x), reference._bn_reduce_dims(x)
    count = x.numel() // (x.shape[0] * x.shape[2]) if x.numel() else 1
    ch = lambda v: v.reshape(shape)
    # Without create_graph nothing here is differentiated: update in place, so that at most three
    # activation-sized tensors live at once.
    inplace = not torch.is_grad_enabled()
    addcmul = lambda t, a, b: t.addcmul_(a, b) if inplace else torch.addcmul(t, a, b)
    w, r, mu = reference._math(weight), rstd.to(go.dtype), mean.to(go.dtype)
    a = w * r
    xh = (xm - ch(mu)) * ch(r)
    B, W = go.sum(dims), (go * xh).sum(dims)
    zero = torch.zeros_like(a)
    cb = zero if gg_b is None else reference._math(gg_b)
    cw = zero if gg_w is None else reference._math(gg_w)
    d_a, U, V = zero, zero, zero
    if gg_x is not None:
        u = reference._math(gg_x)
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


def _bn_backward_backward(ctx, gg_x, gg_w, gg_b):
    return batch_norm_double_backward(gg_x, gg_w, gg_b, *ctx.saved_tensors, needs=ctx.needs_input_grad)


def make_max_pool2x2_relu_autograd(ns):
    """Autograd for `ns.max_pool2x2_relu` (its backward is `ns.max_pool2x2_relu_backward`, whose own
    backward is a gather: linear in grad_out, so the double backward of MAML flows through)."""

    def setup(ctx, inputs, output):
        (x,) = inputs
        ctx.height, ctx.width = x.shape[-2], x.shape[-1]
        ctx.save_for_backward(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_index):
        if grad_out is None:
            return None
        (index,) = ctx.saved_tensors
        return ns.max_pool2x2_relu_backward(grad_out, index, ctx.height, ctx.width)

    return setup, backward


def make_pool_backward_autograd(ns):
    """Autograd for `ns.max_pool2x2_relu_backward` (linear in grad_out: its adjoint is the gather
    `ns.max_pool2x2_relu_gather`, whose own adjoint is the backward again)."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward(ctx, grad_grad_x):
        (index,) = ctx.saved_tensors
        return ns.max_pool2x2_relu_gather(grad_grad_x, index), None, None, None

    def gather_setup(ctx, inputs, output):
        grad_x, index = inputs
        ctx.height, ctx.width = grad_x.shape[-2], grad_x.shape[-1]
        ctx.save_for_backward(index)

    def gather_backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        return ns.max_pool2x2_relu_backward(grad_out, index, ctx.height, ctx.width), None

    return setup, backward, gather_setup, gather_backward


def conv3x3_bn_pool_relu_param_grads(ns, grad_out, index, x, weight, gamma, groups, eps):
    """Gradients of conv3x3_bn_pool_relu's weight, gamma and beta from grad_out, in differentiable
    ops (so autograd gives the double backward). With pc the centred input patches at the kept
    maxima, V = sum(g * pc), S = sum(g) (ns.conv3x3_bn_pool_relu_patch_sums, whose adjoint is the
    patch gather), s = w . V, C the centred Gram matrix and r = rstd(w) = (w' C w / M + eps)^-1/2:
        d beta = S,  d gamma = r s,  d w = gamma r V - gamma r^3 s C w / M."""
    pbar, gram = ns.conv3x3_bn_pool_relu_moments(x, groups)
    sum_pc, sum_g = ns.conv3x3_bn_pool_relu_patch_sums(grad_out, index, x, pbar, groups)
    out_channels = weight.shape[0]
    w = weight.reshape(out_channels, -1).double()
    count = x.shape[0] * x.shape[2] * x.shape[3]
    cw = torch.bmm(gram.repeat_interleave(out_channels // groups, 0), w.unsqueeze(-1)).squeeze(-1)
    r = torch.rsqrt((w * cw).sum(1) / count + eps)
    s = (w * sum_pc).sum(1)
    g = gamma.double()
    grad_w = (g * r).unsqueeze(1) * sum_pc - (g * r.pow(3) * s / count).unsqueeze(1) * cw
    return grad_w.to(weight.dtype).reshape(weight.shape), (r * s).to(gamma.dtype), sum_g.to(gamma.dtype)


def make_conv3x3_bn_pool_relu_autograd(ns):
    """Autograd for `ns.conv3x3_bn_pool_relu` and its linear pieces. The gradients of weight, gamma
    and beta come from `conv3x3_bn_pool_relu_param_grads` (differentiable again: MAML's double
    backward); a gradient of x or of the returned statistics recomputes the block with the
    composed ops (conv2d, batch_norm, max_pool2x2_relu) and differentiates those."""

    def setup(ctx, inputs, output):
        x, weight, bias, gamma, beta, ctx.groups, ctx.eps = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, gamma, beta, output[1])
        ctx.set_materialize_grads(False)

    def composed(x, weight, bias, gamma, beta, groups, eps):
        h = torch.nn.functional.conv2d(x, weight, bias, padding=1, groups=groups)
        y, mean, rstd = ns.batch_norm(h.unsqueeze(0), gamma.unsqueeze(0), beta.unsqueeze(0), eps)
        return ns.max_pool2x2_relu(y.squeeze(0))[0], mean[0], rstd[0]

    def backward(ctx, grad_out, grad_index, grad_mean, grad_rstd):
        x, weight, bias, gamma, beta, index = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_mean is None and grad_rstd is None and not need[0]:
            if grad_out is None:
                return None, None, None, None, None, None, None
            grad_w, grad_gamma, grad_beta = conv3x3_bn_pool_relu_param_grads(ns, grad_out, index, x, weight, gamma,
                                                                             ctx.groups, ctx.eps)
            # The normalisation removes any per-channel shift: the conv bias has no gradient.
            grad_bias = torch.zeros_like(bias) if ctx.has_bias and need[2] else None
            return None, grad_w, grad_bias, grad_gamma, grad_beta, None, None
        inputs = [x, weight, bias, gamma, beta]
        create_graph = torch.is_grad_enabled()
        if not create_graph:  # fresh leaves for a graph of its own
            inputs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(inputs, need)]
        with torch.enable_grad():
            outputs = composed(*inputs, ctx.groups, ctx.eps)
        pairs = [(o, g) for o, g in zip(outputs, (grad_out, grad_mean, grad_rstd)) if g is not None]
        wanted = [i for i, t in enumerate(inputs) if t is not None and need[i]]
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=create_graph, allow_unused=True)
        result = [None] * 7
        for i, g in zip(wanted, grads):
            result[i] = torch.zeros_like(inputs[i]) if g is None else g
        return tuple(result)

    # patch_sums (linear in grad_out) and patch_gather (linear in u, c) are each other's adjoints.
    def sums_setup(ctx, inputs, output):
        grad_out, index, x, pbar, ctx.groups = inputs
        ctx.dtype = grad_out.dtype
        ctx.save_for_backward(index, x, pbar)

    def sums_backward(ctx, grad_sum_pc, grad_sum_g):
        index, x, pbar = ctx.saved_tensors
        u = torch.zeros((index.shape[1], pbar.shape[1]), dtype=torch.float64, device=x.device) \
            if grad_sum_pc is None else grad_sum_pc
        c = torch.zeros(index.shape[1], dtype=torch.float64, device=x.device) if grad_sum_g is None else grad_sum_g
        return ns.conv3x3_bn_pool_relu_patch_gather(u, c, index, x, pbar, ctx.groups).to(ctx.dtype), None, None, None, None

    def gather_setup(ctx, inputs, output):
        u, c, index, x, pbar, ctx.groups = inputs
        ctx.dtypes = (u.dtype, c.dtype)
        ctx.save_for_backward(index, x, pbar)

    def gather_backward(ctx, grad_out):
        index, x, pbar = ctx.saved_tensors
        sum_pc, sum_g = ns.conv3x3_bn_pool_relu_patch_sums(grad_out, index, x, pbar, ctx.groups)
        return sum_pc.to(ctx.dtypes[0]), sum_g.to(ctx.dtypes[1]), None, None, None, None

    return setup, backward, sums_setup, sums_backward, gather_setup, gather_backward


def register_conv3x3_bn_pool_relu(ns_name: str) -> None:
    """Fake kernels and autograd of the fused input block, for namespaces that implement it."""
    lib = torch.library
    for op, fake in (("conv3x3_bn_pool_relu", fake_conv3x3_bn_pool_relu),
                     ("conv3x3_bn_pool_relu_moments", fake_conv3x3_bn_pool_relu_moments),
                     ("conv3x3_bn_pool_relu_patch_sums", fake_conv3x3_bn_pool_relu_patch_sums),
                     ("conv3x3_bn_pool_relu_patch_gather", fake_conv3x3_bn_pool_relu_patch_gather)):
        lib.register_fake(f"{ns_name}::{op}", fake, allow_override=True)
    setup, backward, sums_setup, sums_backward, gather_setup, gather_backward = \
        make_conv3x3_bn_pool_relu_autograd(getattr(torch.ops, ns_name))
    lib.register_autograd(f"{ns_name}::conv3x3_bn_pool_relu", backward, setup_context=setup)
    lib.register_autograd(f"{ns_name}::conv3x3_bn_pool_relu_patch_sums", sums_backward, setup_context=sums_setup)
    lib.register_autograd(f"{ns_name}::conv3x3_bn_pool_relu_patch_gather", gather_backward, setup_context=gather_setup)


def register(ns_name: str) -> None:
    """Register fake kernels and autograd for the ops of namespace `ns_name`."""
    ns = getattr(torch.ops, ns_name)
    lib = torch.library
    for op, fake in (("sgd_step", fake_sgd_step), ("sgd_step_", fake_sgd_step_),
                     ("clip_grad_norm", fake_clip_grad_norm), ("batch_norm", fake_batch_norm),
                     ("batch_norm_backward", fake_batch_norm_backward),
                     ("reptile_update_", fake_reptile_update_), ("max_pool2x2_relu", fake_max_pool2x2_relu),
                     ("max_pool2x2_relu_backward", fake_max_pool2x2_relu_backward),
                     ("max_pool2x2_relu_gather", fake_max_pool2x2_relu_gather)):
        lib.register_fake(f"{ns_name}::{op}", fake, allow_override=True)
    lib.register_autograd(f"{ns_name}::sgd_step", _sgd_backward, setup_context=_sgd_setup)
    lib.register_autograd(f"{ns_name}::clip_grad_norm", _clip_backward, setup_context=_clip_setup)
    bn_setup, bn_backward = make_batch_norm_autograd(ns)
    lib.register_autograd(f"{ns_name}::batch_norm", bn_backward, setup_context=bn_setup)
    lib.register_autograd(f"{ns_name}::batch_norm_backward", _bn_backward_backward, setup_context=_bn_backward_setup)
    pool_setup, pool_backward = make_max_pool2x2_relu_autograd(ns)
    lib.register_autograd(f"{ns_name}::max_pool2x2_relu", pool_backward, setup_context=pool_setup)
    setup, backward, gather_setup, gather_backward = make_pool_backward_autograd(ns)
    lib.register_autograd(f"{ns_name}::max_pool2x2_relu_backward", backward, setup_context=setup)
    lib.register_autograd(f"{ns_name}::max_pool2x2_relu_gather", gather_backward, setup_context=gather_setup)
