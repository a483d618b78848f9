"""momentum_step / momentum_step_ on every backend (the shared cases in stateful_cases.py), and
equal to torch.optim.SGD(momentum) step by step."""
import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import reference
from tests.conftest import DTYPES, SHAPE_SETS, backend_devices
from tests.ops import stateful_cases as cases

MU = 0.9
SPEC = cases.Spec(
    name="momentum_step", n_states=1,
    out_of_place=lambda p, g, s, lrs, sc, r, backend: mk.momentum_step(p, g, s[0], lrs, sc, r, momentum=MU,
                                                                      backend=backend),
    in_place=lambda p, g, s, lrs, sc, r, backend: mk.momentum_step_(p, g, s[0], lrs, sc, r, momentum=MU,
                                                                   backend=backend),
    reference=lambda p, g, s, lrs, sc, r: reference.momentum_step(p, g, s[0], lrs, sc, r, MU))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("T", [None, 1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_rates", [False, True], ids=["lr", "rates"])
def test_momentum_step_matches_reference(backend, device, shapes, T, dtype, with_rates):
    cases.check_matches_reference(SPEC, backend, device, shapes, T, dtype, with_rates)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("T", [None, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_step_inplace_matches_out_of_place(backend, device, T, dtype):
    cases.check_in_place(SPEC, backend, device, T, dtype)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_momentum_step_non_contiguous_inputs(backend, device):
    cases.check_non_contiguous(SPEC, backend, device)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("with_scale,with_rates", [(False, False), (True, True)])
def test_momentum_step_gradients(backend, device, with_scale, with_rates):
    cases.check_gradients(SPEC, backend, device, with_scale, with_rates)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_momentum_step_bad_input(backend, device):
    cases.check_bad_input(SPEC, backend, device)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"momentum must be finite and in \[0, 1\)"):
            mk.momentum_step(p := [torch.zeros(2, 3)], p, p, 0.1, momentum=bad, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_momentum_step_is_torch_optim_sgd(backend, device):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    theirs = [w.clone().requires_grad_() for w in weights]
    opt = torch.optim.SGD(theirs, lr=0.05, momentum=MU)
    bufs = [torch.zeros_like(w) for w in weights]
    for _ in range(4):
        grads = [torch.randn(w.shape, generator=g, dtype=torch.float64).to(device) for w in weights]
        for t, gr in zip(theirs, grads):
            t.grad = gr.clone()
        opt.step()
        weights, bufs = mk.momentum_step(weights, grads, bufs, 0.05, momentum=MU, backend=backend)
    for ours, t in zip(weights, theirs):
        torch.testing.assert_close(ours, t.detach(), rtol=1e-12, atol=1e-12)
