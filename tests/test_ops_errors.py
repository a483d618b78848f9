"""Bad input gets a ValueError that names the argument, on every backend; never a crash inside
a kernel or silently wrong numbers."""
import pytest
import torch

import meta_kernels as mk
from tests.conftest import backend_devices


def _lists(device, T=3):
    p = [torch.randn(T, 4, device=device), torch.randn(T, 2, 3, device=device)]
    g = [torch.randn_like(t) for t in p]
    return p, g


@pytest.mark.parametrize("backend,device", backend_devices())
def test_sgd_step_bad_input(backend, device):
    p, g = _lists(device)
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
    p, g = _lists(device)
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises((ValueError, RuntimeError), match=r"(lrs is on|on meta|on cpu)"):
        mk.sgd_step(p, g, torch.tensor([0.1, 0.2], device=other), backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_inplace_ops_refuse_tensors_that_require_grad(backend, device):
    p, g = _lists(device)
    p = [t.requires_grad_() for t in p]
    with pytest.raises(RuntimeError, match=r"sgd_step_ updates tensors in place"):
        mk.sgd_step_(p, g, 0.1, backend=backend)
    with pytest.raises(RuntimeError, match=r"reptile_update_ updates tensors in place"):
        mk.reptile_update_([t[0] for t in p], [t.detach() for t in p], 0.1, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_bad_input(backend, device):
    _, g = _lists(device)
    with pytest.raises(ValueError, match=r"grads is empty"):
        mk.clip_grad_norm([], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"max_norm must be > 0"):
        mk.clip_grad_norm(g, 0.0, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] has 4 tasks in dim 0 but grads\[0\] has 3"):
        mk.clip_grad_norm([g[0], torch.randn(4, 2, device=device)], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[0\] is 0-dim"):
        mk.clip_grad_norm([torch.tensor(1.0, device=device)], 1.0, backend=backend)


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
def test_reptile_update_bad_input(backend, device):
    theta = [torch.randn(4, device=device), torch.randn(2, 3, device=device)]
    phi = [torch.randn(5, 4, device=device), torch.randn(5, 2, 3, device=device)]
    with pytest.raises(ValueError, match=r"adapted has 1 tensors but params has 2"):
        mk.reptile_update_(theta, phi[:1], 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"adapted\[1\] has shape \[5, 3, 2\] but must be \[T, \*params\[1\].shape\]"):
        mk.reptile_update_(theta, [phi[0], torch.randn(5, 3, 2, device=device)], 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"adapted\[1\] has 4 tasks in dim 0 but adapted\[0\] has 5"):
        mk.reptile_update_(theta, [phi[0], torch.randn(4, 2, 3, device=device)], 0.1, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_max_pool2x2_relu_bad_input(backend, device):
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H, W\]"):
        mk.max_pool2x2_relu(torch.randn(5, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"H >= 2 and W >= 2"):
        mk.max_pool2x2_relu(torch.randn(3, 1, 4, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"x must be floating point"):
        mk.max_pool2x2_relu(torch.ones(4, 4, dtype=torch.int64, device=device), backend=backend)


def test_max_pool2x2_relu_backward_bad_input():
    ns = torch.ops.meta_kernels
    go = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match=r"index must be torch.int8"):
        ns.max_pool2x2_relu_backward(go, torch.zeros(2, 3, 3, dtype=torch.int64), 6, 6)
    with pytest.raises(ValueError, match=r"index has shape"):
        ns.max_pool2x2_relu_backward(go, torch.zeros(2, 3, 2, dtype=torch.int8), 6, 6)
    with pytest.raises(ValueError, match=r"do not pool to"):
        ns.max_pool2x2_relu_backward(go, torch.zeros(2, 3, 3, dtype=torch.int8), 8, 6)
    gx = torch.randn(2, 6, 7)
    with pytest.raises(ValueError, match=r"index must be torch.int8"):
        ns.max_pool2x2_relu_gather(gx, torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"pools to"):
        ns.max_pool2x2_relu_gather(gx, torch.zeros(2, 3, 2, dtype=torch.int8))


def test_unknown_backend_and_unusable_backend():
    p, g = _lists("cpu")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        mk.sgd_step(p, g, 0.1, backend="fast")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not usable here"):
        mk.sgd_step(p, g, 0.1, backend="cuda")
