"""max_pool2x2_relu, its backward and its gather on every backend: exactly F.relu(F.max_pool2d),
ties, NaN, every row width of the CPU vector path, the gather as the backward's adjoint,
gradcheck / gradgradcheck, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import meta_kernels as mk
from meta_kernels.ops import _registry, reference
from tests.conftest import DTYPES, backend_devices, check_grad_and_gradgrad, gen

POOL_SHAPES = [(2, 2), (5, 7), (2, 3, 8, 6), (3, 4, 9, 11), (2, 32, 28, 28), (1, 64, 3, 3)]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool2x2_relu_matches_torch(backend, device, shape, dtype):
    """Exactly F.relu(F.max_pool2d(x, 2)) (a max is exact in any precision), gradient too."""
    x = torch.randn(shape, generator=gen(12), dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    flat = x.reshape(-1, 1, *shape[-2:])
    want = F.relu(F.max_pool2d(flat.float() if dtype == torch.bfloat16 else flat, 2))
    want = want.reshape(*shape[:-2], *want.shape[-2:]).to(dtype)
    got = mk.max_pool2x2_relu(x, backend=backend)
    assert torch.equal(got, want)
    go = torch.randn(got.shape, generator=gen(13), dtype=torch.float64).to(device=device, dtype=dtype)
    (grad,) = torch.autograd.grad(got, x, go)
    (grad_want,) = torch.autograd.grad(want, x, go)
    assert torch.equal(grad, grad_want)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_max_pool2x2_relu_ties_nan_and_non_contiguous(backend, device):
    x = torch.tensor([[[1.0, 3.0, -1.0, -2.0], [3.0, 0.5, -3.0, -1.0],
                       [float("nan"), 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]]], device=device, requires_grad=True)
    out = mk.max_pool2x2_relu(x, backend=backend)
    assert out[0, 0, 0] == 3.0 and out[0, 0, 1] == 0.0 and torch.isnan(out[0, 1, 0]) and out[0, 1, 1] == 0.0
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    # The tie goes to the first maximum (row-major in the window); all-negative and zero windows get none.
    assert grad[0, 0, 1] == 1.0 and grad[0, 1, 0] == 0.0 and grad[0, :2, 2:].abs().sum() == 0
    assert grad[0, 2:, 2:].abs().sum() == 0 and grad[0, 2, 0] == 1.0
    base = torch.randn(4, 6, 10, device=device)
    strided = base.transpose(1, 2)  # [4, 10, 6], not contiguous
    assert torch.equal(mk.max_pool2x2_relu(strided, backend=backend), F.relu(F.max_pool2d(strided.unsqueeze(1), 2)).squeeze(1))


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] in ("cpp", "cuda")])
@pytest.mark.parametrize("height", [2, 3, 7, 28])
def test_max_pool2x2_relu_every_row_width(backend, device, height):
    """Row widths on both sides of the CPU kernel's 8-wide vectors (short rows that spill into the
    next row, long rows ending in an overlapping vector, odd widths), plane counts that split
    unevenly over threads; values from a small set (ties everywhere), zeros, negatives and NaNs
    (several per window): window position and gradient exactly as the reference."""
    g = gen(14)
    for width in [2, 3, 4, 5, 6, 7, 14, 15, 16, 17, 18, 28, 31, 33]:
        for planes in (1, 3, 515):
            x = torch.randint(-2, 3, (planes, height, width), generator=g).double()
            x[torch.rand(x.shape, generator=g) < 0.1] = float("nan")
            x = x.float().to(device)
            out, index = torch.ops.meta_kernels.max_pool2x2_relu(x)  # the cpp / cuda kernel, index included
            want_out, want_index = reference.max_pool2x2_relu(x)
            assert torch.equal(index, want_index), (planes, height, width)
            assert torch.equal(out.isnan(), want_out.isnan()) and torch.equal(out.nan_to_num(), want_out.nan_to_num())
            go = torch.randn(out.shape, generator=g).to(device)
            grad = torch.ops.meta_kernels.max_pool2x2_relu_backward(go, index, height, width)
            assert torch.equal(grad, reference.max_pool2x2_relu_backward(go, index, height, width)), (planes, height, width)


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "reference"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (5, 7), (3, 4, 9, 11), (2, 5, 3, 3), (0, 4, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_max_pool2x2_relu_gather_matches_reference(backend, device, shape, dtype):
    """The pool backward's adjoint (what MAML's meta-gradient runs through): exactly the reference
    gather, on odd sizes (a dropped last row / column), index -1 entries, NaN in dropped positions,
    and a non-contiguous grad_x; its own adjoint is the pool backward."""
    ns = _registry.namespace(backend)
    g = gen(15)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    _, index = ns.max_pool2x2_relu(x)
    grad_x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    grad_x[(torch.rand(shape, generator=g) < 0.2).to(device)] = float("nan")
    grad_x[..., :2 * index.shape[-2], :2 * index.shape[-1]] = grad_x[..., :2 * index.shape[-2], :2 * index.shape[-1]].nan_to_num(0.5)
    grad_x = grad_x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, not contiguous
    got = ns.max_pool2x2_relu_gather(grad_x, index)
    assert torch.equal(got, reference.max_pool2x2_relu_gather(grad_x, index))
    if 0 not in shape:
        go = torch.randn(index.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        leaf = grad_x.detach().requires_grad_()
        (adj,) = torch.autograd.grad(ns.max_pool2x2_relu_gather(leaf, index), leaf, go)
        assert torch.equal(adj, ns.max_pool2x2_relu_backward(go, index, shape[-2], shape[-1]))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 5, 7)], ids=str)
def test_max_pool2x2_relu_gradients(backend, device, shape):
    # Values well apart from each other and from 0: finite differences must not cross a max or the ReLU kink.
    x = (torch.randperm(int(torch.tensor(shape).prod()), dtype=torch.float64) - 20.5).reshape(shape) * 0.1
    check_grad_and_gradgrad(lambda t: mk.max_pool2x2_relu(t, backend=backend), (x.to(device).requires_grad_(),))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_max_pool2x2_relu_bad_input(backend, device):
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H, W\]"):
        mk.max_pool2x2_relu(torch.randn(5, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"H >= 2 and W >= 2"):
        mk.max_pool2x2_relu(torch.randn(3, 1, 4, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"x must be floating point"):
        mk.max_pool2x2_relu(torch.ones(4, 4, dtype=torch.int64, device=device), backend=backend)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_max_pool2x2_relu_backward_bad_input(device):
    """The backward and the gather have no front-end: on meta tensors their fake kernels run the
    Python checks (the messages users see); a direct call of the compiled kernel with the same bad
    arguments stops at its invariant check, never reading out of bounds."""
    ns = torch.ops.meta_kernels
    full = device == "meta"
    msg = lambda pattern: pattern if full else r"meta_kernels::max_pool2x2_relu_\w+: invalid arguments"
    go = torch.randn(2, 3, 3, device=device)
    with pytest.raises(ValueError, match=msg(r"index must be torch.int8")):
        ns.max_pool2x2_relu_backward(go, torch.zeros(2, 3, 3, dtype=torch.int64, device=device), 6, 6)
    with pytest.raises(ValueError, match=msg(r"index has shape")):
        ns.max_pool2x2_relu_backward(go, torch.zeros(2, 3, 2, dtype=torch.int8, device=device), 6, 6)
    with pytest.raises(ValueError, match=msg(r"do not pool to")):
        ns.max_pool2x2_relu_backward(go, torch.zeros(2, 3, 3, dtype=torch.int8, device=device), 8, 6)
    gx = torch.randn(2, 6, 7, device=device)
    with pytest.raises(ValueError, match=msg(r"index must be torch.int8")):
        ns.max_pool2x2_relu_gather(gx, torch.zeros(2, 3, 3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=msg(r"pools to")):
        ns.max_pool2x2_relu_gather(gx, torch.zeros(2, 3, 2, dtype=torch.int8, device=device))
