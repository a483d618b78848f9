"""batch_norm on every backend: values and gradients against the reference and F.batch_norm per task,
shared affine and running statistics, gradcheck / gradgradcheck of the op and of its backward, the
closed-form double backward, and bad input."""
import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import _registry, reference
from meta_kernels.tensor_utils import compute_dtype
from tests.conftest import DTYPES, F64, assert_no_worse_than_torch, backend_devices, check_grad_and_gradgrad, gen

BN_SHAPES = [(1, 5, 3, 7, 7), (32, 5, 2, 3, 3), (3, 2, 4, 1, 1), (2, 7, 3, 33, 17), (4, 6, 5)]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_forward_backward_matches_reference(backend, device, shape, dtype):
    g = gen(10)
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
@pytest.mark.parametrize("shape", [(2, 9, 3, 26, 26), (3, 40, 4)], ids=str)
def test_batch_norm_statistics_keep_precision_far_from_zero(backend, device, shape):
    """Activations of mean 1000 and spread 0.05 in float32: the statistics, merged from per-sample
    partial sums, are no worse than torch's own float32 batch norm against float64."""
    g = gen(11)
    x64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.05 + 1000).to(device)
    x32 = x64.float()
    T, C = shape[0], shape[2]
    w, b = torch.ones(T, C, device=device), torch.zeros(T, C, device=device)
    out, mean, var = mk.batch_norm(x32, w, b, backend=backend, return_stats=True)
    truth = reference.batch_norm(x32.double(), w.double(), b.double(), 1e-5)[0]
    torch_out = torch.stack([torch.nn.functional.batch_norm(x32[t], None, None, training=True) for t in range(T)])
    assert_no_worse_than_torch(out, torch_out, truth, torch.float32, factor=4.0, what="out")
    dims = [1] + list(range(3, len(shape)))
    torch.testing.assert_close(mean.double(), x32.double().mean(dims), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x32.double().var(dims), rtol=1e-3, atol=0)  # unbiased, as returned


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
    # One shared set of running statistics: the tasks as successive batches, in task order, as
    # torch's BatchNorm run task by task leaves them.
    loop = torch.nn.BatchNorm2d(2, momentum=0.5).double().to(device)
    for t in range(3):
        loop(x[t])
    torch.testing.assert_close(rm, loop.running_mean)
    torch.testing.assert_close(rv, loop.running_var)
    # A cumulative average (momentum None in torch) passes one momentum per task: 1 / batches seen.
    rm, rv = torch.zeros(2, **F64).to(device), torch.ones(2, **F64).to(device)
    mk.batch_norm(x, w, b, running_mean=rm, running_var=rv, momentum=[1.0, 0.5, 1 / 3], backend=backend)
    cumulative = torch.nn.BatchNorm2d(2, momentum=None).double().to(device)
    for t in range(3):
        cumulative(x[t])
    torch.testing.assert_close(rm, cumulative.running_mean)
    torch.testing.assert_close(rv, cumulative.running_var)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 3, 2, 1, 2), (1, 4, 3)], ids=str)
def test_batch_norm_gradients(backend, device, shape):
    g = torch.Generator().manual_seed(3)
    T, C = shape[0], shape[2]
    x = torch.randn(shape, generator=g, **F64).to(device).requires_grad_()
    w = torch.randn(T, C, generator=g, **F64).to(device).requires_grad_()
    b = torch.randn(T, C, generator=g, **F64).to(device).requires_grad_()
    check_grad_and_gradgrad(lambda x, w, b: mk.batch_norm(x, w, b, backend=backend), (x, w, b))


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "reference"])
def test_batch_norm_statistics_outputs_are_differentiable(backend, device):
    """The raw op also returns mean and rstd; gradients through them are right too."""
    ns = _registry.namespace(backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 2, 2, generator=g, **F64).to(device).requires_grad_()
    w = torch.randn(2, 2, generator=g, **F64).to(device).requires_grad_()
    b = torch.randn(2, 2, generator=g, **F64).to(device).requires_grad_()
    check_grad_and_gradgrad(lambda x, w, b: ns.batch_norm(x, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("adjoints", ["x", "weight", "bias", "all"])
def test_batch_norm_double_backward_closed_form(adjoints):
    """The closed-form double backward of batch_norm_backward (what MAML's meta-gradient runs
    through) equals autograd through the reference backward formula, for each adjoint alone."""
    from meta_kernels.ops.batch_norm import double_backward as batch_norm_double_backward
    from meta_kernels.ops.reference import batch_norm, batch_norm_backward
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 3, 5, generator=g, **F64)
    w = torch.randn(2, 4, generator=g, **F64)
    _, mean, rstd = batch_norm(x, w, torch.zeros_like(w), 1e-5)
    mean = mean + 0.1 * torch.randn(mean.shape, generator=g, **F64)  # inputs in their own right
    go = torch.randn(x.shape, generator=g, **F64)
    inputs = [t.clone().requires_grad_() for t in (go, x, w, mean, rstd)]
    gg = {"x": torch.randn(x.shape, generator=g, **F64), "weight": torch.randn(w.shape, generator=g, **F64),
          "bias": torch.randn(w.shape, generator=g, **F64)}
    gg = {k: v if adjoints in (k, "all") else None for k, v in gg.items()}
    outs = batch_norm_backward(*inputs)
    pairs = [(o, a) for o, a in zip(outs, gg.values()) if a is not None]
    expected = torch.autograd.grad([o for o, _ in pairs], inputs, [a for _, a in pairs], allow_unused=True)
    for create_graph in (True, False):  # without it the closed form updates in place
        with torch.set_grad_enabled(create_graph):
            got = batch_norm_double_backward(*gg.values(), go, x, w, mean, rstd)
        for e, r in zip(expected, got):
            if e is None:
                assert r is None or r.abs().max() == 0
            else:
                torch.testing.assert_close(r, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "reference"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_double_backward_kernel_matches_the_closed_form(backend, device, shape, dtype):
    """The fused batch_norm_double_backward against the closed form in torch ops: in float64 on
    the same inputs, and no worse than the closed form run in `dtype` itself."""
    from meta_kernels.ops.batch_norm import double_backward as closed_form
    ns = _registry.namespace(backend)
    g = gen(11)
    T, C = shape[0], shape[2]
    x = (torch.randn(shape, generator=g, **F64) * 2 + 0.5).to(device)
    w = torch.randn(T, C, generator=g, **F64).to(device)
    _, mean, rstd = reference.batch_norm(x, w, torch.zeros_like(w), 1e-5)
    go, gg_x = (torch.randn(shape, generator=g, **F64).to(device) for _ in range(2))
    gg_w, gg_b = (torch.randn(T, C, generator=g, **F64).to(device) for _ in range(2))
    args64 = (gg_x, gg_w, gg_b, go, x, w, mean, rstd)
    truth = closed_form(*args64)
    low = lambda t: t.to(dtype) if t.dim() > 2 else t  # activations in dtype, statistics as the ops keep them
    ours = ns.batch_norm_double_backward(*map(low, args64))
    theirs = closed_form(*map(low, args64))
    names = ("d_grad_out", "d_x", "d_weight", "d_mean", "d_rstd")
    for name, o, r, t in zip(names, ours, theirs, truth):
        assert o.shape == t.shape, name
        assert_no_worse_than_torch(o, r, t, dtype, factor=4.0, what=name)


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "reference"])
def test_batch_norm_meta_gradient_takes_the_fused_double_backward(backend, device, monkeypatch):
    """A second-order step through batch_norm (MAML's) runs the fused double backward, and its
    meta-gradient equals the one through the reference batch norm."""
    ns = _registry.namespace(backend)
    calls = []
    fused = ns.batch_norm_double_backward
    monkeypatch.setattr(ns, "batch_norm_double_backward", lambda *a: calls.append(1) or fused(*a), raising=False)
    g = gen(12)
    x = torch.randn(3, 4, 2, 5, 5, generator=g, **F64).to(device)
    y = torch.randn(3, 4, 2, 5, 5, generator=g, **F64).to(device)

    def meta_grad(bn):
        w = torch.randn(3, 2, generator=gen(13), **F64).to(device).requires_grad_()
        b = torch.randn(3, 2, generator=gen(14), **F64).to(device).requires_grad_()
        inner = ((bn(x, w, b) - y) ** 2).sum()
        gw, gb = torch.autograd.grad(inner, (w, b), create_graph=True)
        outer = ((bn(x, w - 0.1 * gw, b - 0.1 * gb) - y) ** 2 * y).sum()
        return torch.autograd.grad(outer, (w, b))

    ours = meta_grad(lambda x, w, b: mk.batch_norm(x, w, b, backend=backend))
    expected = meta_grad(lambda x, w, b: reference.batch_norm(x, w, b, 1e-5)[0])
    assert calls, "the fused double backward did not run"
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


# With grad_mean / grad_rstd only on the C++ backends: their autograd is shared Python, and the Triton
# kernel's values with them are checked against the reference below (its gradgradcheck under the
# interpreter costs 14 s).
@pytest.mark.parametrize("backend,device,statistics_grads",
                         [pytest.param(*p.values, False, marks=p.marks, id=f"{p.id}-grad_out")
                          for p in backend_devices() if p.values[0] != "reference"] +
                         [pytest.param(*p.values, True, marks=p.marks, id=f"{p.id}-with_grad_mean_rstd")
                          for p in backend_devices() if p.values[0] in ("cpp", "cuda")])
def test_batch_norm_backward_op_gradients(backend, device, statistics_grads):
    """The op's own backward (the closed form) checked to second order: its result stays
    differentiable under create_graph, also in grad_mean / grad_rstd and their path into grad_x."""
    ns = _registry.namespace(backend)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 2, 2, generator=g, **F64)
    w = torch.randn(2, 2, generator=g, **F64)
    _, mean, rstd = ns.batch_norm(x, w, torch.zeros_like(w), 1e-5)
    extra = (torch.randn(2, 2, generator=g, **F64), torch.randn(2, 2, generator=g, **F64)) if statistics_grads else ()
    inputs = [t.to(device).requires_grad_() for t in (torch.randn(x.shape, generator=g, **F64), x, w, mean, rstd, *extra)]
    check_grad_and_gradgrad(lambda *ts: ns.batch_norm_backward(*ts), tuple(inputs))


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "reference"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_backward_with_statistics_gradients_matches_reference(backend, device, shape, dtype):
    """grad_mean / grad_rstd (MAML's meta-gradient brings them from the double backward) join grad_x
    inside the fused backward: no worse than the reference formula in the same dtype."""
    g = gen(12)
    T, C = shape[0], shape[2]
    x = (torch.randn(shape, generator=g, **F64) * 3 + 1).to(device)
    go = torch.randn(shape, generator=g, **F64).to(device)
    w, g_mean, g_rstd = (torch.randn(T, C, generator=g, **F64).to(device) for _ in range(3))
    _, mean, rstd = reference.batch_norm(x, w, torch.zeros_like(w), 1e-5)
    args = lambda dt: (go.to(dt), x.to(dt), w.to(dt), mean.to(compute_dtype(dt)), rstd.to(compute_dtype(dt)),
                       g_mean.to(compute_dtype(dt)), g_rstd.to(compute_dtype(dt)))
    ours = _registry.namespace(backend).batch_norm_backward(*args(dtype))
    same = reference.batch_norm_backward(*args(dtype))
    truth = reference.batch_norm_backward(*args(torch.float64))
    for name, o, r, t in zip(("grad_x", "grad_weight", "grad_bias"), ours, same, truth):
        assert_no_worse_than_torch(o, r, t, dtype, factor=4.0, what=name)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_batch_norm_bad_input(backend, device):
    x = torch.randn(2, 3, 4, 5, 5, device=device)
    with pytest.raises(ValueError, match=r"x must be \[T, N, C, \*spatial\]"):
        mk.batch_norm(torch.randn(3, 4, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"weight must be \[T, C\] = \[2, 4\]"):
        mk.batch_norm(x, torch.ones(2, 5, device=device), torch.zeros(2, 5, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"bias must have the shape of weight"):
        mk.batch_norm(x, torch.ones(2, 4, device=device), torch.zeros(3, 4, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"running statistics must be \[C\] or \[T, C\]"):
        mk.batch_norm(x, running_mean=torch.zeros(7, device=device), backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=0.0), r"eps must be finite and > 0, got 0.0"),
    (dict(eps=-1e-5), r"eps must be finite and > 0, got -1e-05"),
    (dict(eps=float("nan")), r"eps must be finite and > 0, got nan"),
    (dict(eps=float("inf")), r"eps must be finite and > 0, got inf"),
    (dict(momentum=5.0), r"momentum must be in \[0, 1\], got 5.0"),
    (dict(momentum=-0.1), r"momentum must be in \[0, 1\], got -0.1"),
    (dict(momentum=float("nan")), r"momentum must be in \[0, 1\], got nan"),
], ids=str)
def test_batch_norm_scalar_checks(backend, device, kwargs, match):
    x = torch.randn(2, 3, 4, 5, 5, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with pytest.raises(ValueError, match=match):
        mk.batch_norm(x, running_mean=rm, running_var=rv, backend=backend, **kwargs)
    assert bool((rm == 0).all()) and bool((rv == 1).all())


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 1, 3, 1, 1), (1, 1, 4, 1)], ids=str)
def test_batch_norm_one_value_per_channel_raises_as_torch(backend, device, shape):
    """N = 1 with no spatial extent: one value per (task, channel). torch's F.batch_norm refuses it
    in training mode; so does every backend (no silent output of the bias)."""
    x = torch.randn(shape, device=device)
    per_task = x[0].reshape(x.shape[1], x.shape[2], -1)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel"):
        torch.nn.functional.batch_norm(per_task, None, None, training=True)
    with pytest.raises(ValueError, match=r"more than 1 value per channel in training mode"):
        mk.batch_norm(x, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_batch_norm_one_sample_with_spatial_extent_matches_torch(backend, device):
    """N = 1 with a spatial extent holds several values per channel: normalised as torch does."""
    x = torch.randn(3, 1, 2, 3, 3, dtype=torch.float64, device=device)
    w, b = torch.randn(3, 2, dtype=torch.float64, device=device), torch.randn(3, 2, dtype=torch.float64, device=device)
    expected = torch.stack([torch.nn.functional.batch_norm(x[t], None, None, w[t], b[t], True, 0.0, 1e-5)
                            for t in range(3)])
    torch.testing.assert_close(mk.batch_norm(x, w, b, backend=backend), expected)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 0, 3, 4, 4), (2, 0, 3), (2, 4, 3, 0, 5)], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_task_stats", "shared_stats"])
def test_batch_norm_empty_batch_matches_torch(backend, device, shape, shared):
    """N = 0 (or an empty spatial extent), as torch's F.batch_norm in training mode: an empty
    output, running statistics left as they are (no decay, no NaN), zero gradients for the
    affine -- the same on every backend."""
    T, C = shape[0], shape[2]
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(T, C, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(T, C, dtype=torch.float64, device=device, requires_grad=True)
    stat_shape = (C,) if shared else (T, C)
    rm = torch.full(stat_shape, 0.5, dtype=torch.float64, device=device)
    rv = torch.full(stat_shape, 2.0, dtype=torch.float64, device=device)
    out = mk.batch_norm(x, w, b, running_mean=rm, running_var=rv, momentum=0.1, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool((rm == 0.5).all()) and bool((rv == 2.0).all())
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape
    assert bool((gw == 0).all()) and bool((gb == 0).all())
    # torch itself, task by task
    trm, trv = torch.full((C,), 0.5, dtype=torch.float64), torch.full((C,), 2.0, dtype=torch.float64)
    wt, bt = w[0].detach().cpu().requires_grad_(), b[0].detach().cpu().requires_grad_()
    ref = torch.nn.functional.batch_norm(x[0].detach().cpu(), trm, trv, wt, bt, True, 0.1, 1e-5)
    assert ref.shape == out.shape[1:]
    assert bool((trm == 0.5).all()) and bool((trv == 2.0).all())
    torch.testing.assert_close(torch.autograd.grad(ref.sum(), (wt, bt)), (gw[0].cpu(), gb[0].cpu()))
