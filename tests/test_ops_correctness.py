"""Every backend of every op against the float64 reference, on fresh random inputs: numel 1,
sizes that are no multiple of any block or chunk size, mixed sizes in one list, T = 1 and 32,
float32 / float64 / bfloat16 (bf16 storage, fp32 math)."""
import pytest
import torch
import torch.nn.functional as F

import meta_kernels as mk
from meta_kernels.ops import reference
from tests.conftest import assert_no_worse_than_torch, backend_devices

# Per-task parameter shapes: numel 1, odd sizes, a conv weight, one crossing the CPU chunk (16384).
SHAPE_SETS = {
    "numel1": [(1,)],
    "mixed": [(1027,), (3, 5, 7), (64, 1, 3, 3), (1,), (16411,)],
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lists(shapes, T, dtype, device, seed):
    g = _gen(seed)
    lead = () if T is None else (T,)
    make = lambda s: torch.randn(lead + s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return [make(s) for s in shapes], [make(s) for s in shapes]


def _truth(ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("T", [None, 1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_step_matches_reference(backend, device, shapes, T, dtype):
    params, grads = _lists(SHAPE_SETS[shapes], T, dtype, device, seed=hash((shapes, T)) % 2**31)
    lrs = torch.rand(len(params), generator=_gen(1), dtype=torch.float64).to(device=device, dtype=torch.float32)
    scale = None if T is None else torch.rand(T, generator=_gen(2)).to(device)
    ours = mk.sgd_step(params, grads, lrs, scale, backend=backend)
    torch_same = reference.sgd_step(params, grads, lrs, scale)
    truth = reference.sgd_step(_truth(params), _truth(grads), lrs.double(), None if scale is None else scale.double())
    for i, (o, r, t) in enumerate(zip(ours, torch_same, truth)):
        assert o.shape == params[i].shape and o.dtype == dtype
        assert_no_worse_than_torch(o, r, t, dtype, what=f"sgd_step[{i}]")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("T", [None, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_step_inplace_matches_out_of_place(backend, device, T, dtype):
    params, grads = _lists(SHAPE_SETS["mixed"], T, dtype, device, seed=3)
    lrs = torch.rand(len(params), generator=_gen(4)).to(device)
    scale = None if T is None else torch.rand(T, generator=_gen(5)).to(device)
    expected = mk.sgd_step(params, grads, lrs, scale, backend=backend)
    mk.sgd_step_(params, grads, lrs, scale, backend=backend)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_sgd_step_non_contiguous_inputs(backend, device):
    base = torch.randn(32, 6, 10, generator=_gen(6), dtype=torch.float64).to(device)
    params = [base[:, :, ::2], base.transpose(1, 2)]  # strided and transposed views
    grads = [torch.randn_like(p) for p in params]
    grads[1] = grads[1].transpose(1, 2).contiguous().transpose(1, 2)
    lrs = torch.tensor([0.1, 0.3], dtype=torch.float64, device=device)
    scale = torch.rand(32, dtype=torch.float64, device=device)
    truth = reference.sgd_step(params, grads, lrs, scale)
    for o, t in zip(mk.sgd_step(params, grads, lrs, scale, backend=backend), truth):
        torch.testing.assert_close(o, t)
    views = [torch.empty(32, 6, 10, dtype=torch.float64, device=device)[:, :, ::2].copy_(params[0]),
             torch.empty(32, 6, 10, dtype=torch.float64, device=device).transpose(1, 2).copy_(params[1])]
    mk.sgd_step_(views, grads, lrs, scale, backend=backend)
    for v, t in zip(views, truth):
        torch.testing.assert_close(v, t)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("T", [1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_norm_matches_reference(backend, device, shapes, T, dtype):
    _, grads = _lists(SHAPE_SETS[shapes], T, dtype, device, seed=7)
    max_norm = 2.0
    norm, factor = mk.clip_grad_norm(grads, max_norm, backend=backend)
    assert norm.shape == (T,) and factor.shape == (T,)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch_norm, torch_factor = reference.clip_grad_norm(grads, max_norm, 1e-6)
    true_norm, true_factor = reference.clip_grad_norm(_truth(grads), max_norm, 1e-6)
    # The reference sums in the storage dtype; ours accumulates in fp32 at least.
    assert_no_worse_than_torch(norm, torch_norm, true_norm, torch.float32 if dtype == torch.bfloat16 else dtype,
                               what="norm")
    assert_no_worse_than_torch(factor, torch_factor, true_factor, torch.float32 if dtype == torch.bfloat16 else dtype,
                               what="factor")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_against_torch_clip(backend, device):
    """Per task, the factor equals what torch.nn.utils.clip_grad_norm_ applies."""
    _, grads = _lists(SHAPE_SETS["mixed"], 4, torch.float64, device, seed=8)
    norm, factor = mk.clip_grad_norm(grads, 3.0, backend=backend)
    for t in range(4):
        task = [torch.zeros_like(g[t], requires_grad=True) for g in grads]
        for p, g in zip(task, grads):
            p.grad = g[t].clone()
        total = torch.nn.utils.clip_grad_norm_(task, 3.0, foreach=False)
        torch.testing.assert_close(norm[t], total.to(norm.dtype))
        torch.testing.assert_close(task[0].grad, grads[0][t] * factor[t])


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_non_finite(backend, device):
    """Documented behaviour: a non-finite norm is returned as is and its factor is NaN; other
    tasks are unaffected."""
    _, grads = _lists(SHAPE_SETS["mixed"], 3, torch.float32, device, seed=9)
    grads[0][0, 5] = float("inf")
    grads[2][2, 0, 0] = float("nan")
    norm, factor = mk.clip_grad_norm(grads, 1.0, backend=backend)
    assert torch.isinf(norm[0]) and torch.isnan(factor[0])
    assert torch.isfinite(norm[1]) and torch.isfinite(factor[1])
    assert torch.isnan(norm[2]) and torch.isnan(factor[2])


BN_SHAPES = [(1, 5, 3, 7, 7), (32, 5, 2, 3, 3), (3, 1, 4, 1, 1), (2, 7, 3, 33, 17), (4, 6, 5)]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_forward_backward_matches_reference(backend, device, shape, dtype):
    g = _gen(10)
    T, C = shape[0], shape[2]
    x64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(device)
    w64 = torch.randn(T, C, generator=g, dtype=torch.float64).to(device)
    b64 = torch.randn(T, C, generator=g, dtype=torch.float64).to(device)
    go64 = torch.randn(shape, generator=g, dtype=torch.float64).to(device)

    def run(fn, dt):
        x, w, b = (t.to(dt).requires_grad_() for t in (x64, w64, b64))
        out = fn(x, w, b)
        out.backward(go64.to(dt))
        return out.detach(), x.grad, w.grad, b.grad

    ours = run(lambda x, w, b: mk.batch_norm(x, w, b, backend=backend), dtype)
    torch_same = run(lambda x, w, b: reference.batch_norm(x, w, b, 1e-5)[0], dtype)
    truth = run(lambda x, w, b: reference.batch_norm(x, w, b, 1e-5)[0], torch.float64)
    for name, o, r, t in zip(("out", "grad_x", "grad_weight", "grad_bias"), ours, torch_same, truth):
        assert o.dtype == dtype, name
        assert_no_worse_than_torch(o, r, t, dtype, factor=4.0, what=name)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_batch_norm_matches_functional_per_task(backend, device):
    """Against torch's own F.batch_norm applied task by task (training mode)."""
    x = torch.randn(4, 5, 3, 6, 6, dtype=torch.float64, device=device)
    w = torch.randn(4, 3, dtype=torch.float64, device=device)
    b = torch.randn(4, 3, dtype=torch.float64, device=device)
    expected = torch.stack([torch.nn.functional.batch_norm(x[t], None, None, w[t], b[t], True, 0.0, 1e-5)
                            for t in range(4)])
    torch.testing.assert_close(mk.batch_norm(x, w, b, backend=backend), expected)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_batch_norm_shared_affine_and_running_stats(backend, device):
    x = torch.randn(3, 8, 2, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=device)
    rm, rv = torch.zeros(2, dtype=torch.float64, device=device), torch.ones(2, dtype=torch.float64, device=device)
    out = mk.batch_norm(x, w, b, running_mean=rm, running_var=rv, momentum=0.5, backend=backend)
    expected = torch.stack([torch.nn.functional.batch_norm(x[t], None, None, w, b, True, 0.0, 1e-5) for t in range(3)])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert w.grad is not None
    per_task_mean = x.mean(dim=(1, 3, 4))
    per_task_var = x.transpose(1, 2).reshape(3, 2, -1).var(dim=2, unbiased=True)
    torch.testing.assert_close(rm, 0.5 * per_task_mean.mean(0))
    torch.testing.assert_close(rv, 0.5 + 0.5 * per_task_var.mean(0))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("T", [1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reptile_update_matches_reference(backend, device, T, dtype):
    g = _gen(11)
    shapes = SHAPE_SETS["mixed"]
    theta64 = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    phi64 = [torch.randn((T,) + s, generator=g, dtype=torch.float64) for s in shapes]
    ours = [t.to(device=device, dtype=dtype) for t in theta64]
    mk.reptile_update_(ours, [p.to(device=device, dtype=dtype) for p in phi64], 0.3, backend=backend)
    torch_same = [t.to(device=device, dtype=dtype) for t in theta64]
    reference.reptile_update_(torch_same, [p.to(device=device, dtype=dtype) for p in phi64], 0.3)
    truth = [t.clone().to(device) for t in theta64]
    reference.reptile_update_(truth, [p.to(device) for p in phi64], 0.3)
    for i, (o, r, t) in enumerate(zip(ours, torch_same, truth)):
        assert_no_worse_than_torch(o, r, t, dtype, factor=4.0, what=f"reptile[{i}]")


POOL_SHAPES = [(2, 2), (5, 7), (2, 3, 8, 6), (3, 4, 9, 11), (2, 32, 28, 28), (1, 64, 3, 3)]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool2x2_relu_matches_torch(backend, device, shape, dtype):
    """Exactly F.relu(F.max_pool2d(x, 2)) (a max is exact in any precision), gradient too."""
    x = torch.randn(shape, generator=_gen(12), dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    flat = x.reshape(-1, 1, *shape[-2:])
    want = F.relu(F.max_pool2d(flat.float() if dtype == torch.bfloat16 else flat, 2))
    want = want.reshape(*shape[:-2], *want.shape[-2:]).to(dtype)
    got = mk.max_pool2x2_relu(x, backend=backend)
    assert torch.equal(got, want)
    go = torch.randn(got.shape, generator=_gen(13), dtype=torch.float64).to(device=device, dtype=dtype)
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
    g = _gen(14)
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


def test_auto_picks_cpp_on_cpu():
    assert mk.backend_info()["auto"]["cpu"] == "cpp"


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "reference"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (5, 7), (3, 4, 9, 11), (2, 5, 3, 3), (0, 4, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_max_pool2x2_relu_gather_matches_reference(backend, device, shape, dtype):
    """The pool backward's adjoint (what MAML's meta-gradient runs through): exactly the reference
    gather, on odd sizes (a dropped last row / column), index -1 entries, NaN in dropped positions,
    and a non-contiguous grad_x; its own adjoint is the pool backward."""
    ns = torch.ops.meta_kernels if backend in ("cpp", "cuda") else torch.ops.meta_kernels_triton
    g = _gen(15)
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
