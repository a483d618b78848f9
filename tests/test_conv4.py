"""Conv4's own pieces: the grouped convolution of its inner steps to second order, and its input
layer as the fused conv3x3_bn_pool_relu op against the composed reference ops."""
import pytest
import torch
import torch.nn.functional as F

import meta_kernels as mk
from meta_kernels.meta import TaskModel
from meta_kernels.models.conv4 import Conv4
from tests.conftest import F64, check_grad_and_gradgrad


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
    check_grad_and_gradgrad(conv, inputs)
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


@pytest.mark.parametrize("T", [1, 3])
def test_conv4_fused_input_layer_matches_the_composed_one(T):
    """Conv4's input layer as the fused op (backend cpp) and as the composed reference ops give the
    same logits, gradients and second-order gradients (MAML's double backward)."""
    torch.manual_seed(0)
    model = Conv4.omniglot(5).double()
    params = {k: v.detach().unsqueeze(0).repeat(T, *([1] * v.dim())).requires_grad_() for k, v in
              model.named_parameters()}
    x = torch.rand(T, 7, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 5, (T, 7))
    results = []
    for backend in ("cpp", "reference"):
        with mk.use_backend(backend):
            logits = TaskModel(model)(params, x, double_backward=True)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            second = torch.autograd.grad(sum((g * g).sum() for g in grads), list(params.values()), allow_unused=True)
        results.append((logits, grads, second))
    (l1, g1, s1), (l2, g2, s2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-10)
    for name, a, b, sa, sb, p in zip(params, g1, g2, s1, s2, params.values()):
        if name == "blocks.0.conv.bias":  # exactly zero fused, rounding noise composed
            assert a.abs().max() == 0 and b.abs().max() < 1e-12
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
        sa, sb = (torch.zeros_like(p) if t is None else t for t in (sa, sb))
        torch.testing.assert_close(sa, sb, rtol=1e-7, atol=1e-9, msg=f"second order {name}")
