"""sgd_step / sgd_step_ on every backend: values against the float64 reference (numel 1, sizes no
multiple of any block, mixed sizes, T = 1 and 32, float32 / float64 / bfloat16), in place equal to
out of place, non-contiguous inputs, gradcheck / gradgradcheck, and bad input."""
import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import reference
from tests.conftest import (
    DTYPES,
    F64,
    SHAPE_SETS,
    as_float64,
    assert_no_worse_than_torch,
    backend_devices,
    check_grad_and_gradgrad,
    gen,
    small_lists,
    tensor_lists,
)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("T", [None, 1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_step_matches_reference(backend, device, shapes, T, dtype):
    params, grads = tensor_lists(SHAPE_SETS[shapes], T, dtype, device, seed=hash((shapes, T)) % 2**31)
    lrs = torch.rand(len(params), generator=gen(1), dtype=torch.float64).to(device=device, dtype=torch.float32)
    scale = None if T is None else torch.rand(T, generator=gen(2)).to(device)
    ours = mk.sgd_step(params, grads, lrs, scale, backend=backend)
    torch_same = reference.sgd_step(params, grads, lrs, scale)
    truth = reference.sgd_step(as_float64(params), as_float64(grads), lrs.double(), None if scale is None else scale.double())
    for i, (o, r, t) in enumerate(zip(ours, torch_same, truth)):
        assert o.shape == params[i].shape and o.dtype == dtype
        assert_no_worse_than_torch(o, r, t, dtype, what=f"sgd_step[{i}]")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("T", [None, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_step_inplace_matches_out_of_place(backend, device, T, dtype):
    params, grads = tensor_lists(SHAPE_SETS["mixed"], T, dtype, device, seed=3)
    lrs = torch.rand(len(params), generator=gen(4)).to(device)
    scale = None if T is None else torch.rand(T, generator=gen(5)).to(device)
    expected = mk.sgd_step(params, grads, lrs, scale, backend=backend)
    mk.sgd_step_(params, grads, lrs, scale, backend=backend)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_sgd_step_non_contiguous_inputs(backend, device):
    base = torch.randn(32, 6, 10, generator=gen(6), dtype=torch.float64).to(device)
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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_scale", [True, False])
def test_sgd_step_from_a_base_expanded_over_tasks(backend, device, dtype, with_scale):
    """The inner loop's first step: the shared weights expanded to [T, ...] (stride 0) and a
    batched weight gradient laid out transposed, as a bmm gives it."""
    T = 32
    bases = [torch.randn(7, 13, generator=gen(11)).to(device, dtype), torch.randn(5, generator=gen(12)).to(device, dtype)]
    params = [b.expand(T, *b.shape) for b in bases]
    grads = [torch.randn(T, 13, 7, generator=gen(13)).to(device, dtype).transpose(1, 2),
             torch.randn(T, 5, generator=gen(14)).to(device, dtype)]
    lrs = torch.tensor([0.1, 0.3], device=device)
    scale = torch.rand(T, generator=gen(15)).to(device) if with_scale else None
    ours = mk.sgd_step(params, grads, lrs, scale, backend=backend)
    torch_same = reference.sgd_step(params, grads, lrs, scale)
    truth = reference.sgd_step(as_float64(params), as_float64(grads), lrs.double(), None if scale is None else scale.double())
    for i, (o, r, t) in enumerate(zip(ours, torch_same, truth)):
        assert o.shape == params[i].shape and o.dtype == dtype and o.is_contiguous()
        assert_no_worse_than_torch(o, r, t, dtype, what=f"sgd_step[{i}]")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("with_scale", [False, True])
def test_sgd_step_gradients(backend, device, with_scale):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (3, 5), (3,)]
    params = [torch.randn(s, generator=g, **F64).to(device).requires_grad_() for s in shapes]
    grads = [torch.randn(s, generator=g, **F64).to(device).requires_grad_() for s in shapes]
    lrs = torch.rand(3, generator=g, **F64).to(device).requires_grad_()
    scale = torch.rand(3, generator=g, **F64).to(device).requires_grad_()

    def fn(*flat):
        p, gr, lr = list(flat[:3]), list(flat[3:6]), flat[6]
        s = flat[7] if with_scale else None
        return tuple(mk.sgd_step(p, gr, lr, s, backend=backend))

    check_grad_and_gradgrad(fn, (*params, *grads, lrs, scale) if with_scale else (*params, *grads, lrs))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_sgd_step_bad_input(backend, device):
    p, g = small_lists(device)
    lrs = torch.tensor([0.1, 0.2], device=device)
    cases = [
        ((p, g[:1], lrs, None), r"grads has 1 tensors but params has 2"),
        ((p, [g[0], torch.randn(3, 3, 2, device=device)], lrs, None), r"grads\[1\] has shape \[3, 3, 2\] but params\[1\] has shape \[3, 2, 3\]"),
        ((p, [g[0], g[1].double()], lrs, None), r"grads\[1\] is torch.float64 but params\[1\] is torch.float32"),
        (([p[0], p[1].double()], [g[0], g[1].double()], lrs, None), r"params\[1\] is torch.float64 but params\[0\] is torch.float32"),
        ((p, g, torch.tensor([0.1, 0.2, 0.3], device=device), None), r"lrs must be a 1-D tensor with one rate per tensor \(2\)"),
        ((p, g, lrs, torch.ones(4, device=device)), r"scale has 4 entries but params have 3 tasks"),
        ((p, g, lrs, torch.ones(3, 1, device=device)), r"scale must be 1-D"),
        (([p[0], torch.randn(5, 2, device=device)], [g[0], torch.randn(5, 2, device=device)], lrs,
          torch.ones(3, device=device)), r"params\[1\] has 5 tasks in dim 0 but params\[0\] has 3"),
        (([torch.ones(3, 4, dtype=torch.int64, device=device)], [torch.ones(3, 4, dtype=torch.int64, device=device)],
          lrs[:1], None), r"params\[0\] must be floating point"),
        (([], [], lrs, None), r"params is empty"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            mk.sgd_step(*args, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_sgd_step_device_mismatch(backend, device):
    p, g = small_lists(device)
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises((ValueError, RuntimeError), match=r"(lrs is on|on meta|on cpu)"):
        mk.sgd_step(p, g, torch.tensor([0.1, 0.2], device=other), backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_inplace_ops_refuse_tensors_that_require_grad(backend, device):
    p, g = small_lists(device)
    p = [t.requires_grad_() for t in p]
    with pytest.raises(RuntimeError, match=r"sgd_step_ updates tensors in place"):
        mk.sgd_step_(p, g, 0.1, backend=backend)
    with pytest.raises(RuntimeError, match=r"reptile_update_ updates tensors in place"):
        mk.reptile_update_([t[0] for t in p], [t.detach() for t in p], 0.1, backend=backend)
