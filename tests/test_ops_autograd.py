"""gradcheck and gradgradcheck in float64 for every differentiable op on every backend: the
second-order MAML meta-gradient flows through these backward formulas."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import meta_kernels as mk
from tests.conftest import backend_devices

F64 = dict(dtype=torch.float64)


def _check_both(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


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

    _check_both(fn, (*params, *grads, lrs, scale) if with_scale else (*params, *grads, lrs))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_gradients(backend, device):
    g = torch.Generator().manual_seed(1)
    # Task 0 is far below the threshold (factor 1), task 1 far above (clipped): both branches.
    grads = [torch.randn(2, 3, generator=g, **F64), torch.randn(2, 4, generator=g, **F64)]
    for t in grads:
        t[0] *= 0.05
    grads = [t.to(device).requires_grad_() for t in grads]

    def fn(*gs):
        return mk.clip_grad_norm(list(gs), 1.0, backend=backend)

    _check_both(fn, tuple(grads))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_then_step_gradients(backend, device):
    """The fused pair as the inner loop uses it: clip factor feeding sgd_step's scale."""
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(2, 3, generator=g, **F64).to(device).requires_grad_()]
    grads = [(3 * torch.randn(2, 3, generator=g, **F64)).to(device).requires_grad_()]
    lrs = torch.tensor([0.3], **F64, device=device, requires_grad=True)

    def fn(p, gr, lr):
        _, factor = mk.clip_grad_norm([gr], 1.0, backend=backend)
        return mk.sgd_step([p], [gr], lr, factor, backend=backend)[0]

    _check_both(fn, (params[0], grads[0], lrs))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 3, 2, 2, 2), (1, 4, 3)], ids=str)
def test_batch_norm_gradients(backend, device, shape):
    g = torch.Generator().manual_seed(3)
    T, C = shape[0], shape[2]
    x = torch.randn(shape, generator=g, **F64).to(device).requires_grad_()
    w = torch.randn(T, C, generator=g, **F64).to(device).requires_grad_()
    b = torch.randn(T, C, generator=g, **F64).to(device).requires_grad_()
    _check_both(lambda x, w, b: mk.batch_norm(x, w, b, backend=backend), (x, w, b))


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "reference"])
def test_batch_norm_statistics_outputs_are_differentiable(backend, device):
    """The raw op also returns mean and rstd; gradients through them are right too."""
    ns = torch.ops.meta_kernels if backend in ("cpp", "cuda") else torch.ops.meta_kernels_triton
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 2, 3, generator=g, **F64).to(device).requires_grad_()
    w = torch.randn(2, 2, generator=g, **F64).to(device).requires_grad_()
    b = torch.randn(2, 2, generator=g, **F64).to(device).requires_grad_()
    _check_both(lambda x, w, b: ns.batch_norm(x, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 5, 7)], ids=str)
def test_max_pool2x2_relu_gradients(backend, device, shape):
    # Values well apart from each other and from 0: finite differences must not cross a max or the ReLU kink.
    x = (torch.randperm(int(torch.tensor(shape).prod()), dtype=torch.float64) - 20.5).reshape(shape) * 0.1
    _check_both(lambda t: mk.max_pool2x2_relu(t, backend=backend), (x.to(device).requires_grad_(),))


@pytest.mark.parametrize("adjoints", ["x", "weight", "bias", "all"])
def test_batch_norm_double_backward_closed_form(adjoints):
    """The closed-form double backward of batch_norm_backward (what MAML's meta-gradient runs
    through) equals autograd through the reference backward formula, for each adjoint alone."""
    from meta_kernels.ops._autograd import batch_norm_double_backward
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
    ns = torch.ops.meta_kernels if backend in ("cpp", "cuda") else torch.ops.meta_kernels_triton
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 2, 3, generator=g, **F64)
    w = torch.randn(2, 2, generator=g, **F64)
    _, mean, rstd = ns.batch_norm(x, w, torch.zeros_like(w), 1e-5)
    inputs = [t.to(device).requires_grad_() for t in (torch.randn(x.shape, generator=g, **F64), x, w, mean, rstd)]
    _check_both(lambda *ts: ns.batch_norm_backward(*ts), tuple(inputs))


@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_grouped_conv_double_backward(x_needs_grad):
    """Conv4's grouped conv for MAML's inner steps: gradients to second order equal F.conv2d's
    (checked against finite differences), and without a gradient for x (the first layer) the
    backward keeps no grad_out."""
    from meta_kernels.models.conv4 import _GroupedConv
    g = torch.Generator().manual_seed(7)
    T = 3
    x = torch.randn(2, T * 2, 5, 4, generator=g, **F64).requires_grad_(x_needs_grad)
    w = torch.randn(T * 3, 2, 3, 3, generator=g, **F64).requires_grad_()
    b = torch.randn(T * 3, generator=g, **F64).requires_grad_()
    inputs = (x, w, b) if x_needs_grad else (w, b)
    conv = (lambda x, w, b: _GroupedConv.apply(x, w, b, T)) if x_needs_grad else (lambda w, b: _GroupedConv.apply(x, w, b, T))
    _check_both(conv, inputs)
    saved = []
    out = _GroupedConv.apply(x, w, b, T)
    v = torch.randn(out.shape, generator=g, **F64).requires_grad_()  # the incoming gradient
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.autograd.grad(out, inputs, v, create_graph=True)
    assert any(t is v for t in saved) == x_needs_grad
    grads = torch.autograd.grad(_GroupedConv.apply(x, w, b, T).pow(2).sum(), inputs, create_graph=True)
    ref = torch.autograd.grad(torch.nn.functional.conv2d(x, w, b, padding=1, groups=T).pow(2).sum(), inputs,
                              create_graph=True)
    probe = [torch.randn(t.shape, generator=g, **F64) for t in grads]
    got = torch.autograd.grad(grads, inputs, probe)
    want = torch.autograd.grad(ref, inputs, probe)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
