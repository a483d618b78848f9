"""conv3x3_bn_pool_relu, the fused input block (cpp kernel and reference): values, statistics
and gradients against the composed float64 reference on odd shapes, every dtype, both the
scalar rows and the 8-window vector rows; gradcheck / gradgradcheck; the patch pieces of its
backward; bad input."""
import pytest
import torch
import torch.nn.functional as F

import meta_kernels as mk
import meta_kernels.ops as ops
from meta_kernels.ops import reference
from tests.conftest import DTYPES, assert_no_worse_than_torch

BACKENDS = ["cpp", "reference"]


SHAPES = [(5, 3, 1, 4, 7, 9), (1, 2, 3, 5, 8, 6), (4, 1, 4, 3, 5, 5), (6, 2, 1, 8, 28, 28), (3, 1, 3, 4, 17, 38)]


def _inputs(shape, dtype, seed):
    N, G, cin, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = torch.rand(N, G * cin, H, W, generator=g, dtype=torch.float64)  # images: all >= 0, mean far from 0
    return (x.to(dtype), rnd(G * C, cin, 3, 3).to(dtype), rnd(G * C).to(dtype), (rnd(G * C).abs() + 0.5).to(dtype),
            rnd(G * C).to(dtype)), G


def _reference_grads(args, groups, grad_out):
    leaves = [a.detach().double().requires_grad_(i > 0) for i, a in enumerate(args)]
    out = reference.conv3x3_bn_pool_relu(*leaves, groups, 1e-5)[0]
    return torch.autograd.grad(out, leaves[1:], grad_out.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_composed_reference(backend, shape, dtype):
    args, G = _inputs(shape, dtype, seed=hash(shape) % 2**31)
    truth = reference.conv3x3_bn_pool_relu(*[a.double() for a in args], G, 1e-5)
    torch_same = reference.conv3x3_bn_pool_relu(*args, G, 1e-5)
    leaves = [a.clone().requires_grad_(i > 0) for i, a in enumerate(args)]
    if backend == "cpp":
        out, index, mean, rstd = torch.ops.meta_kernels.conv3x3_bn_pool_relu(*leaves, G, 1e-5)
        if dtype == torch.float64:  # no near-ties at this precision: the same windows win
            assert torch.equal(index, truth[1])
        assert_no_worse_than_torch(mean, torch_same[2], truth[2], dtype, what="mean")
        assert_no_worse_than_torch(rstd, torch_same[3], truth[3], dtype, what="rstd")
    else:
        out = mk.conv3x3_bn_pool_relu(*leaves, groups=G, backend=backend)
    assert out.shape == truth[0].shape and out.dtype == dtype
    assert_no_worse_than_torch(out, torch_same[0], truth[0], dtype, what="out")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves[1:], grad_out.to(dtype))
    want = _reference_grads(args, G, grad_out)
    for name, got, t in zip(("weight", "bias", "gamma", "beta"), grads, want):
        if name == "bias":  # the normalisation removes a per-channel shift: zero, up to the reference's rounding
            assert got.abs().max() <= 1e-9 * max(1.0, grad_out.abs().sum().item()) or backend == "reference"
            continue
        ref_leaves = [a.detach().clone().requires_grad_(i > 0) for i, a in enumerate(args)]
        ref_same = torch.autograd.grad(reference.conv3x3_bn_pool_relu(*ref_leaves, G, 1e-5)[0], ref_leaves[1:],
                                       grad_out.to(dtype))
        idx = ("weight", "bias", "gamma", "beta").index(name)
        assert_no_worse_than_torch(got, ref_same[idx], t, dtype, factor=4.0, what=f"grad {name}")


@pytest.mark.parametrize("with_x_grad", [False, True])
def test_gradcheck_and_gradgradcheck(with_x_grad):
    (x, w, b, gamma, beta), G = _inputs((4, 2, 1, 3, 6, 5), torch.float64, seed=7)
    x.requires_grad_(with_x_grad)
    leaves = [t.requires_grad_() for t in (w, b, gamma, beta)]
    fn = lambda *a: mk.conv3x3_bn_pool_relu(*a, groups=G, backend="cpp")
    assert torch.autograd.gradcheck(fn, (x, *leaves))
    assert torch.autograd.gradgradcheck(fn, (x, *leaves))


@pytest.mark.parametrize("create_graph", [False, True])
def test_fused_backward_equals_the_composed_one(create_graph):
    """The backward from patch sums (first order, and differentiable again) and the composed ops'
    backward (taken when x needs a gradient) agree, and so do their double backwards."""
    (x, w, b, gamma, beta), G = _inputs((6, 2, 1, 8, 28, 28), torch.float64, seed=3)
    results = []
    for x_grad in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (w, b, gamma, beta)]
        xin = x.clone().requires_grad_(x_grad)
        out = mk.conv3x3_bn_pool_relu(xin, *leaves, groups=G, backend="cpp")
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        grads = torch.autograd.grad(out, leaves, go, create_graph=create_graph)
        if create_graph:  # a MAML-like second-order term
            grads = torch.autograd.grad(sum((g * g).sum() for g in grads[:1] + grads[2:]), leaves, allow_unused=True)
        results.append(grads)
    for name, leaf, f, c in zip(("weight", "bias", "gamma", "beta"), (w, b, gamma, beta), *results):
        # No path from a leaf (the bias; beta in the second order, where it only moves the maxima) is a zero gradient.
        f, c = (torch.zeros_like(leaf) if t is None else t for t in (f, c))
        torch.testing.assert_close(f, c, rtol=1e-9, atol=1e-10, msg=name)


def test_patch_moments_sums_and_gather_match_plain_torch():
    """The pieces of the backward against unfold: the mean patch, the centred Gram matrix, the sums
    over the kept maxima, and the gather as their exact adjoint."""
    (x, w, b, gamma, beta), G = _inputs((3, 2, 3, 4, 9, 20), torch.float64, seed=11)
    ns = torch.ops.meta_kernels
    out, index, _, _ = ns.conv3x3_bn_pool_relu(x, w, b, gamma, beta, G, 1e-5)
    pbar, gram = ns.conv3x3_bn_pool_relu_moments(x, G)
    N, _, H, W = x.shape
    patches = F.unfold(x, 3, padding=1).reshape(N, G, 27, H, W)  # [N, G, K, H, W]
    flat = patches.permute(1, 2, 0, 3, 4).reshape(G, 27, -1)
    torch.testing.assert_close(pbar, flat.mean(-1), rtol=1e-12, atol=1e-12)
    centred = flat - flat.mean(-1, keepdim=True)
    torch.testing.assert_close(gram, centred @ centred.transpose(1, 2), rtol=1e-10, atol=1e-10)
    g = torch.randn(out.shape, dtype=torch.float64)
    sum_pc, sum_g = ns.conv3x3_bn_pool_relu_patch_sums(g, index, x, pbar, G)
    routed = reference.max_pool2x2_relu_backward(g, index, H, W)  # g at the kept maxima, [N, OC, H, W]
    C = out.shape[1] // G
    pc = (patches - pbar.reshape(1, G, 27, 1, 1)).repeat_interleave(C, 1)  # [N, OC, K, H, W]
    torch.testing.assert_close(sum_pc, (routed.unsqueeze(2) * pc).sum((0, 3, 4)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum_g, routed.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    u, c = torch.randn(out.shape[1], 27, dtype=torch.float64), torch.randn(out.shape[1], dtype=torch.float64)
    gathered = ns.conv3x3_bn_pool_relu_patch_gather(u, c, index, x, pbar, G)
    adjoint = (gathered * g).sum()
    torch.testing.assert_close(adjoint, (u * sum_pc).sum() + (c * sum_g).sum(), rtol=1e-10, atol=1e-10)
    assert (gathered[index < 0] == 0).all()


def test_nan_input_propagates():
    (x, w, b, gamma, beta), G = _inputs((3, 2, 1, 4, 8, 16), torch.float32, seed=9)
    x[1, 0, 3, 5] = float("nan")
    out = mk.conv3x3_bn_pool_relu(x, w, b, gamma, beta, groups=G, backend="cpp")
    C = w.shape[0] // G
    assert torch.isnan(out[:, :C]).all()  # the group's statistics are NaN
    assert torch.isfinite(out[:, C:]).all()  # the other group is untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    (x, w, b, gamma, beta), G = _inputs((3, 2, 1, 4, 8, 8), torch.float32, seed=2)
    call = lambda *a, groups=G: mk.conv3x3_bn_pool_relu(*a, groups=groups, backend=backend)
    with pytest.raises(ValueError, match="channels"):
        call(x, w, b, gamma, beta, groups=3)
    with pytest.raises(ValueError, match="1 to 4 channels per group"):
        call(torch.rand(3, 10, 8, 8), torch.randn(8, 5, 3, 3), b, gamma, beta)
    with pytest.raises(ValueError, match="gamma must be"):
        call(x, w, b, gamma[:-1], beta)
    with pytest.raises(ValueError, match="3, 3"):
        call(x, torch.randn(8, 1, 5, 5), b, gamma, beta)
    with pytest.raises(ValueError, match="H >= 2"):
        call(x[:, :, :1], w, b, gamma, beta)
    with pytest.raises(ValueError, match="weight is torch.float64"):
        call(x, w.double(), b, gamma, beta)


def test_backends_without_a_kernel_say_so():
    (x, w, b, gamma, beta), G = _inputs((3, 2, 1, 4, 8, 8), torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="no triton kernel"):
        mk.conv3x3_bn_pool_relu(x, w, b, gamma, beta, groups=G, backend="triton")
    assert ops.has_conv3x3_bn_pool_relu(torch.device("cpu"), "cpp")
