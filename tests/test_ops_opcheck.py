"""torch.library.opcheck on every op of every namespace (schema, fake kernel, autograd
registration, AOT dispatch), and torch.compile(fullgraph=True) of functions using the ops."""
import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import _backend
from tests.conftest import HAS_CUDA

NAMESPACES = []
for ns, device in (("meta_kernels", "cpu"), ("meta_kernels_triton", "cpu"), ("meta_kernels", "cuda"),
                   ("meta_kernels_triton", "cuda")):
    skip = (device == "cuda" and not HAS_CUDA) or (ns == "meta_kernels_triton" and device == "cpu" and HAS_CUDA)
    NAMESPACES.append(pytest.param(ns, device, id=f"{ns}-{device}",
                                   marks=[pytest.mark.skip(reason="needs a CUDA GPU / interpreter")] if skip else []))


def _sample_args(device, requires_grad):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_(requires_grad)
    params = [rnd(4, 3), rnd(4, 5, 2)]
    grads = [rnd(4, 3), rnd(4, 5, 2)]
    lrs = torch.rand(2, generator=g).to(device).requires_grad_(requires_grad)
    scale = torch.rand(4, generator=g).to(device).requires_grad_(requires_grad)
    return params, grads, lrs, scale


def _cases(device):
    params, grads, lrs, scale = _sample_args(device, True)
    x = torch.randn(2, 3, 4, 5, 5, device=device, requires_grad=True)
    w = torch.randn(2, 4, device=device, requires_grad=True)
    b = torch.randn(2, 4, device=device, requires_grad=True)
    out, mean, rstd = torch.ops.meta_kernels.batch_norm(x.detach(), w.detach(), b.detach(), 1e-5) if \
        mk.backend_info()["extension"]["cpu"] else (None, x.mean((1, 3, 4)).detach(), torch.ones(2, 4, device=device))
    plain_p, plain_g, plain_lrs, plain_s = _sample_args(device, False)
    theta = [torch.randn(3, device=device), torch.randn(5, 2, device=device)]
    phi = [torch.randn(4, 3, device=device), torch.randn(4, 5, 2, device=device)]
    return {
        "sgd_step": [(params, grads, lrs, scale), (params, grads, lrs, None)],
        "sgd_step_": [(plain_p, plain_g, plain_lrs, plain_s)],
        "clip_grad_norm": [(grads, 1.0, 1e-6)],
        "batch_norm": [(x, w, b, 1e-5)],
        "batch_norm_backward": [(torch.randn_like(x).requires_grad_(), x, w, mean.requires_grad_(),
                                 rstd.requires_grad_())],
        "reptile_update_": [(theta, phi, 0.5)],
        "max_pool2x2_relu": [(torch.randn(2, 3, 6, 7, device=device, requires_grad=True),)],
        "max_pool2x2_relu_backward": [(torch.randn(2, 3, 3, 3, device=device, requires_grad=True),
                                       torch.randint(-1, 4, (2, 3, 3, 3), device=device, dtype=torch.int8), 6, 7)],
        "max_pool2x2_relu_gather": [(torch.randn(2, 3, 6, 7, device=device, requires_grad=True),
                                     torch.randint(-1, 4, (2, 3, 3, 3), device=device, dtype=torch.int8))],
    }


@pytest.mark.parametrize("ns,device", NAMESPACES)
@pytest.mark.parametrize("op", ["sgd_step", "sgd_step_", "clip_grad_norm", "batch_norm", "batch_norm_backward",
                                "reptile_update_", "max_pool2x2_relu", "max_pool2x2_relu_backward",
                                "max_pool2x2_relu_gather"])
def test_opcheck(ns, device, op):
    if ns == "meta_kernels":
        ok, why = _backend.available("cpp" if device == "cpu" else "cuda", torch.device(device))
        assert ok, why
    packet = getattr(getattr(torch.ops, ns), op)
    for args in _cases(device)[op]:
        torch.library.opcheck(packet.default, args)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_compile_fullgraph_matches_eager(backend):
    """Clip + step + batch norm + reptile under torch.compile(fullgraph=True), values and grads."""
    if backend == "triton" and HAS_CUDA:
        pytest.skip("CPU compile test; the GPU check covers triton on CUDA")
    torch._dynamo.reset()
    params, grads, lrs, _ = _sample_args("cpu", True)
    x = torch.randn(4, 3, 2, 5, 5, requires_grad=True)
    w = torch.randn(4, 2, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)

    def step(params, grads, lrs, x, w, b):
        _, factor = mk.clip_grad_norm(grads, 1.0, backend=backend)
        new = mk.sgd_step(params, grads, lrs, factor, backend=backend)
        y = mk.batch_norm(x, w, b, backend=backend)
        return sum(t.pow(2).sum() for t in new) + y.pow(3).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    eager_loss = step(params, grads, lrs, x, w, b)
    eager_grads = torch.autograd.grad(eager_loss, [*params, *grads, lrs, x, w, b])
    comp_loss = compiled(params, grads, lrs, x, w, b)
    comp_grads = torch.autograd.grad(comp_loss, [*params, *grads, lrs, x, w, b])
    torch.testing.assert_close(comp_loss, eager_loss)
    for e, c in zip(eager_grads, comp_grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)

    theta = [torch.randn(3), torch.randn(5, 2)]
    phi = [torch.randn(4, 3), torch.randn(4, 5, 2)]
    expected = [t.clone() for t in theta]
    mk.reptile_update_(expected, phi, 0.5, backend=backend)
    torch.compile(lambda th, ph: mk.reptile_update_(th, ph, 0.5, backend=backend), fullgraph=True)(theta, phi)
    for t, e in zip(theta, expected):
        torch.testing.assert_close(t, e)
