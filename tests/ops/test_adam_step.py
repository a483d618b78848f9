"""adam_step / adam_step_ on every backend (the shared cases in stateful_cases.py), equal to
torch.optim.Adam step by step, and finite gradients where the second moment is 0."""
import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import reference
from tests.conftest import DTYPES, F64, SHAPE_SETS, backend_devices
from tests.ops import stateful_cases as cases

HYPER = dict(beta1=0.9, beta2=0.99, eps=1e-3, step=3)  # an eps that the gradient checks can resolve
SPEC = cases.Spec(
    name="adam_step", n_states=2,
    out_of_place=lambda p, g, s, lrs, sc, r, backend: mk.adam_step(p, g, s[0], s[1], lrs, sc, r, **HYPER,
                                                                  backend=backend),
    in_place=lambda p, g, s, lrs, sc, r, backend: mk.adam_step_(p, g, s[0], s[1], lrs, sc, r, **HYPER, backend=backend),
    reference=lambda p, g, s, lrs, sc, r: reference.adam_step(p, g, s[0], s[1], lrs, sc, r, *HYPER.values()))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("T", [None, 1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_rates", [False, True], ids=["lr", "rates"])
def test_adam_step_matches_reference(backend, device, shapes, T, dtype, with_rates):
    cases.check_matches_reference(SPEC, backend, device, shapes, T, dtype, with_rates)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("T", [None, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_step_inplace_matches_out_of_place(backend, device, T, dtype):
    cases.check_in_place(SPEC, backend, device, T, dtype)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_adam_step_non_contiguous_inputs(backend, device):
    cases.check_non_contiguous(SPEC, backend, device)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("with_scale,with_rates", [(False, False), (True, True)])
def test_adam_step_gradients(backend, device, with_scale, with_rates):
    cases.check_gradients(SPEC, backend, device, with_scale, with_rates)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_adam_step_bad_input(backend, device):
    cases.check_bad_input(SPEC, backend, device)
    p = [torch.zeros(2, 3)]
    for hyper, pattern in ((dict(beta1=1.0), r"beta1 must be finite and in \[0, 1\)"),
                           (dict(beta2=-0.5), r"beta2 must be finite and in \[0, 1\)"),
                           (dict(eps=0.0), r"eps must be finite and > 0"),
                           (dict(step=0), r"step must be an integer >= 1"),
                           (dict(step=1.5), r"step must be an integer >= 1")):
        with pytest.raises(ValueError, match=pattern):
            mk.adam_step(p, p, p, p, 0.1, **{"step": 1, **hyper}, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_adam_step_is_torch_optim_adam(backend, device):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    theirs = [w.clone().requires_grad_() for w in weights]
    opt = torch.optim.Adam(theirs, lr=0.05, betas=(0.0, 0.99), eps=1e-8)
    m, v = [torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights]
    for step in range(1, 5):
        grads = [torch.randn(w.shape, generator=g, dtype=torch.float64).to(device) for w in weights]
        for t, gr in zip(theirs, grads):
            t.grad = gr.clone()
        opt.step()
        weights, m, v = mk.adam_step(weights, grads, m, v, 0.05, beta1=0.0, beta2=0.99, eps=1e-8, step=step,
                                     backend=backend)
    for ours, t in zip(weights, theirs):
        torch.testing.assert_close(ours, t.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_adam_step_gradient_is_finite_where_the_second_moment_is_zero(backend, device):
    """A gradient entry exactly 0 at every step so far (a dead ReLU): v' = 0 there. The derivative
    of the step wrt the gradient is then (1 - b1) / (c1 * eps) (the limit of the update's
    derivative), and no NaN reaches any input (plain autograd through sqrt gives 0 * inf)."""
    grad = torch.tensor([[0.0, 0.5]], **F64, device=device).requires_grad_()
    zeros = lambda: torch.zeros(1, 2, **F64, device=device).requires_grad_()
    p, m, v = zeros(), zeros(), zeros()
    new_p, new_m, new_v = mk.adam_step([p], [grad], [m], [v], 0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                                       backend=backend)
    d = torch.autograd.grad(new_p[0].sum() + new_m[0].sum() + new_v[0].sum(), [p, grad, m, v])
    assert all(torch.isfinite(t).all() for t in d)
    # d(new p)/dg = -lr (1 - b1) / (c1 eps) with c1 = 1 - b1; d(new m)/dg = 1 - b1; d(new v)/dg = 2 (1 - b2) g = 0.
    assert float(d[1][0, 0]) == pytest.approx(-0.1 * (1 - 0.9) / ((1 - 0.9) * 1e-8) + (1 - 0.9), rel=1e-9)
