"""batch_norm on every backend: values and gradients against the reference and F.batch_norm per task,
shared affine and running statistics, gradcheck / gradgradcheck of the op and of its backward, the
closed-form double backward, and bad input."""
import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import _registry, reference
from tests.conftest import DTYPES, F64, assert_no_worse_than_torch, backend_devices, check_grad_and_gradgrad, gen

BN_SHAPES = [(1, 5, 3, 7, 7), (32, 5, 2, 3, 3), (3, 1, 4, 1, 1), (2, 7, 3, 33, 17), (4, 6, 5)]


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
@pytest.mark.parametrize("shape", [(2, 3, 2, 2, 2), (1, 4, 3)], ids=str)
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
    x = torch.randn(2, 3, 2, 3, generator=g, **F64).to(device).requires_grad_()
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
def test_batch_norm_backward_op_gradients(backend, device):
    """The op's own backward (the closed form) checked to second order: its result stays
    differentiable under create_graph."""
    ns = _registry.namespace(backend)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 2, 3, generator=g, **F64)
    w = torch.randn(2, 2, generator=g, **F64)
    _, mean, rstd = ns.batch_norm(x, w, torch.zeros_like(w), 1e-5)
    inputs = [t.to(device).requires_grad_() for t in (torch.randn(x.shape, generator=g, **F64), x, w, mean, rstd)]
    check_grad_and_gradgrad(lambda *ts: ns.batch_norm_backward(*ts), tuple(inputs))


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
