"""conv3x3_bn_pool_relu: Conv4's input block -- conv 3x3 (padding 1, groups), batch norm with the
batch statistics of each output channel, relu(max_pool2d(., 2)) -- in one op for layers of 1 to 4
input channels per group, without any tensor of the dense conv output's size: the statistics
come from the input's 3x3-patch moments, the gradients of weight, gamma and beta from sums of the
patches at the pooled maxima (the `_moments`, `_patch_sums` and `_patch_gather` kernels, the last
two each other's adjoints, so MAML's double backward needs no dense tensor either).
Checks, fake kernels, autograd and the front-end; the kernel is csrc/cpu/conv3x3_bn_pool_relu.cpp
(CPU only: on GPUs the conv runs in cuDNN and the block takes the composed ops)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, reference
from meta_kernels.tensor_utils import compute_dtype

# Input layers: at most this many channels per group (the patch moments are K x K, K = 9 * C_in).
MAX_IN_CHANNELS = 4
BACKENDS = ("cpp", "reference")


# ---- checks ----------------------------------------------------------------------------------

def check_input(x: Tensor, groups: int) -> None:
    """x [N, groups * C_in, H, W] of the op and of its patch kernels."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating [N, groups * C_in, H, W] tensor, got {x.dtype} {list(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"x's {x.shape[1]} channels do not split into {groups} groups")
    cin = x.shape[1] // groups
    if not 1 <= cin <= MAX_IN_CHANNELS:
        raise ValueError(f"conv3x3_bn_pool_relu is for input layers with 1 to {MAX_IN_CHANNELS} channels "
                         f"per group, got {cin}; use conv2d + batch_norm + max_pool2x2_relu")
    if x.shape[0] < 1 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"conv3x3_bn_pool_relu needs N >= 1, H >= 2 and W >= 2, got x of shape {list(x.shape)}")


def check_args(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, groups: int) -> None:
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [groups * C_out, C_in, 3, 3], got shape {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} but x is {x.dtype}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    cin, out_channels = weight.shape[1], weight.shape[0]
    if x.dim() == 4 and x.shape[1] != groups * cin:
        raise ValueError(f"x has {x.shape[1]} channels but groups ({groups}) * weight's C_in ({cin}) is {groups * cin}")
    if out_channels % groups:
        raise ValueError(f"weight's {out_channels} output channels do not split into {groups} groups")
    check_input(x, groups)
    for name, t in (("gamma", gamma), ("beta", beta), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != out_channels:
            raise ValueError(f"{name} must be [{out_channels}] (one per output channel), got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        _checks.same_device(t, name, x, "x")
    _checks.same_device(weight, "weight", x, "x")


def check_pooled(pooled: Tensor, name: str, index: Tensor, x: Tensor, pbar: Tensor, groups: int) -> None:
    """A pooled [N, C_out, H / 2, W / 2] tensor with its index, x and pbar [groups, 9 * C_in]."""
    check_input(x, groups)
    N, _, H, W = x.shape
    if pooled.dim() != 4 or pooled.shape[0] != N or pooled.shape[1] % groups or tuple(pooled.shape[2:]) != (H // 2, W // 2):
        raise ValueError(f"{name} must be [N, groups * C_out, H / 2, W / 2] for x of shape {list(x.shape)}, "
                         f"got {list(pooled.shape)}")
    if index.dtype != torch.int8 or index.shape != pooled.shape:
        raise ValueError(f"index must be the int8 index output of conv3x3_bn_pool_relu, of shape {list(pooled.shape)}")
    K = 9 * (x.shape[1] // groups)
    if tuple(pbar.shape) != (groups, K):
        raise ValueError(f"pbar must be [{groups}, {K}] (conv3x3_bn_pool_relu_moments), got {list(pbar.shape)}")
    for other, t in (("index", index), ("pbar", pbar), (name, pooled)):
        _checks.same_device(t, other, x, "x")


# ---- fake kernels ----------------------------------------------------------------------------

def _fake(x, weight, bias, gamma, beta, groups, eps):
    check_args(x, weight, bias, gamma, beta, groups)
    shape = (x.shape[0], weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)
    stats = x.new_empty((weight.shape[0],), dtype=compute_dtype(x.dtype))
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8), stats, torch.empty_like(stats)


def _fake_moments(x, groups):
    check_input(x, groups)
    K = 9 * (x.shape[1] // groups)
    return x.new_empty((groups, K), dtype=torch.float64), x.new_empty((groups, K, K), dtype=torch.float64)


def _fake_patch_sums(grad_out, index, x, pbar, groups):
    check_pooled(grad_out, "grad_out", index, x, pbar, groups)
    return (x.new_empty((grad_out.shape[1], pbar.shape[1]), dtype=torch.float64),
            x.new_empty((grad_out.shape[1],), dtype=torch.float64))


def _fake_patch_gather(u, c, index, x, pbar, groups):
    check_pooled(index, "index", index, x, pbar, groups)
    return x.new_empty(index.shape)


# ---- autograd --------------------------------------------------------------------------------

def param_grads(ns, grad_out, index, x, weight, gamma, groups, eps):
    """Gradients of weight, gamma and beta from grad_out, in differentiable ops (so autograd gives
    the double backward). With pc the centred input patches at the kept maxima, V = sum(g * pc),
    S = sum(g) (ns.conv3x3_bn_pool_relu_patch_sums, whose adjoint is the patch gather), s = w . V,
    C the centred Gram matrix and r = rstd(w) = (w' C w / M + eps)^-1/2:
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


def _autograd(ns):
    """Gradients of weight, gamma and beta from `param_grads`; a gradient of x or of the returned
    statistics recomputes the block with the composed ops (conv2d, batch_norm, max_pool2x2_relu)
    and differentiates those."""

    def setup(ctx, inputs, output):
        x, weight, bias, gamma, beta, ctx.groups, ctx.eps = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, gamma, beta, output[1])
        ctx.set_materialize_grads(False)

    def composed(x, weight, bias, gamma, beta, groups, eps):
        h = F.conv2d(x, weight, bias, padding=1, groups=groups)
        y, mean, rstd = ns.batch_norm(h.unsqueeze(0), gamma.unsqueeze(0), beta.unsqueeze(0), eps)
        return ns.max_pool2x2_relu(y.squeeze(0))[0], mean[0], rstd[0]

    def backward(ctx, grad_out, grad_index, grad_mean, grad_rstd):
        x, weight, bias, gamma, beta, index = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_mean is None and grad_rstd is None and not need[0]:
            if grad_out is None:
                return None, None, None, None, None, None, None
            grad_w, grad_gamma, grad_beta = param_grads(ns, grad_out, index, x, weight, gamma, ctx.groups, ctx.eps)
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

    return backward, setup


def _patch_sums_autograd(ns):
    """patch_sums is linear in grad_out; its adjoint is patch_gather."""

    def setup(ctx, inputs, output):
        grad_out, index, x, pbar, ctx.groups = inputs
        ctx.dtype = grad_out.dtype
        ctx.save_for_backward(index, x, pbar)

    def backward(ctx, grad_sum_pc, grad_sum_g):
        index, x, pbar = ctx.saved_tensors
        u = torch.zeros((index.shape[1], pbar.shape[1]), dtype=torch.float64, device=x.device) \
            if grad_sum_pc is None else grad_sum_pc
        c = torch.zeros(index.shape[1], dtype=torch.float64, device=x.device) if grad_sum_g is None else grad_sum_g
        return ns.conv3x3_bn_pool_relu_patch_gather(u, c, index, x, pbar, ctx.groups).to(ctx.dtype), None, None, None, None

    return backward, setup


def _patch_gather_autograd(ns):
    """patch_gather is linear in (u, c); its adjoint is patch_sums."""

    def setup(ctx, inputs, output):
        u, c, index, x, pbar, ctx.groups = inputs
        ctx.dtypes = (u.dtype, c.dtype)
        ctx.save_for_backward(index, x, pbar)

    def backward(ctx, grad_out):
        index, x, pbar = ctx.saved_tensors
        sum_pc, sum_g = ns.conv3x3_bn_pool_relu_patch_sums(grad_out, index, x, pbar, ctx.groups)
        return sum_pc.to(ctx.dtypes[0]), sum_g.to(ctx.dtypes[1]), None, None, None, None

    return backward, setup


# ---- front-end -------------------------------------------------------------------------------

def has_conv3x3_bn_pool_relu(device: torch.device, backend: str | None = None) -> bool:
    """Whether conv3x3_bn_pool_relu has a kernel for tensors of `device` on the chosen backend."""
    return _backend.resolve(backend, device) in BACKENDS


def conv3x3_bn_pool_relu(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, *, groups: int = 1,
                         eps: float = 1e-5, backend: str | None = None) -> Tensor:
    """max_pool2x2_relu(batch_norm(conv2d(x, weight, bias, padding=1, groups))) with the batch
    statistics of each output channel over (N, H, W), in one op for input layers of 1 to 4
    channels per group (x [N, groups * C_in, H, W], weight [groups * C_out, C_in, 3, 3], bias /
    gamma / beta [groups * C_out]). Backends: cpp and reference (others raise). Differentiable to
    any order."""
    name = _backend.resolve(backend, x.device)
    if name not in BACKENDS:
        raise RuntimeError(f"conv3x3_bn_pool_relu has no {name} kernel; it runs on the cpp and reference backends. "
                           "On other backends compose conv2d, batch_norm and max_pool2x2_relu (meta_kernels.models.Conv4 "
                           "does so itself)")
    op = reference.conv3x3_bn_pool_relu if name == "reference" else _registry.namespace(name).conv3x3_bn_pool_relu
    return _checks.checked_call(name, lambda: check_args(x, weight, bias, gamma, beta, groups),
                                lambda: op(x, weight, bias, gamma, beta, groups, float(eps)))[0]


# ---- samples for opcheck and the self-check --------------------------------------------------

def _sample(device, dtype=torch.float32, seed=5):
    """x [3, 2, 8, 7] (2 groups of 1 channel), weight [8, 1, 3, 3], bias / gamma / beta [8]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    x = torch.rand(3, 2, 8, 7, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, rnd(8, 1, 3, 3), rnd(8), rnd(8).abs() + 0.5, rnd(8), 2


def _opcheck_cases(device):
    x, w, b, gamma, beta, G = _sample(device)
    leaves = [t.requires_grad_() for t in (w, b, gamma, beta)]
    out, index, _, _ = reference.conv3x3_bn_pool_relu(x, w.detach(), b.detach(), gamma.detach(), beta.detach(), G, 1e-5)
    N, _, H, W = x.shape
    pbar = F.unfold(x.double(), 3, padding=1).reshape(N, G, 9, H * W).mean((0, 3))
    return [("conv3x3_bn_pool_relu", (x, *leaves, G, 1e-5)), ("conv3x3_bn_pool_relu", (x, w, None, gamma, beta, G, 1e-5)),
            ("conv3x3_bn_pool_relu_moments", (x, G)),
            ("conv3x3_bn_pool_relu_patch_sums", (torch.randn_like(out).requires_grad_(), index, x, pbar, G)),
            ("conv3x3_bn_pool_relu_patch_gather", (torch.randn(w.shape[0], 9, dtype=torch.float64, requires_grad=True),
                                                   torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True),
                                                   index, x, pbar, G))]


def _selfcheck(backend: str) -> None:
    x, *params, G = _sample("cpu", torch.float64)
    params = [p.requires_grad_() for p in params]
    out = conv3x3_bn_pool_relu(x, *params, groups=G, backend=backend)
    ref_out = reference.conv3x3_bn_pool_relu(x, *params, G, 1e-5)[0]
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(torch.autograd.grad((out * out.detach().cos()).sum(), params, allow_unused=True, materialize_grads=True),
                               torch.autograd.grad((ref_out * ref_out.detach().cos()).sum(), params, allow_unused=True, materialize_grads=True),
                               rtol=1e-7, atol=1e-9)


OP = _registry.add(_registry.OpDef(
    name="conv3x3_bn_pool_relu",
    kernels=(_registry.Kernel("conv3x3_bn_pool_relu",
                              "(Tensor x, Tensor weight, Tensor? bias, Tensor gamma, Tensor beta, int groups, float eps) -> "
                              "(Tensor out, Tensor index, Tensor mean, Tensor rstd)", _fake, _autograd),
             _registry.Kernel("conv3x3_bn_pool_relu_moments", "(Tensor x, int groups) -> (Tensor pbar, Tensor gram)",
                              _fake_moments),
             _registry.Kernel("conv3x3_bn_pool_relu_patch_sums",
                              "(Tensor grad_out, Tensor index, Tensor x, Tensor pbar, int groups) -> "
                              "(Tensor sum_pc, Tensor sum_g)", _fake_patch_sums, _patch_sums_autograd),
             _registry.Kernel("conv3x3_bn_pool_relu_patch_gather",
                              "(Tensor u, Tensor c, Tensor index, Tensor x, Tensor pbar, int groups) -> Tensor",
                              _fake_patch_gather, _patch_gather_autograd)),
    backends=BACKENDS, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck))
