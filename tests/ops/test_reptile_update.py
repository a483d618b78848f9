"""reptile_update_ on every backend: values against the float64 reference, and bad input."""
import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import reference
from tests.conftest import (
    DTYPES,
    SHAPE_SETS,
    assert_no_worse_than_torch,
    backend_devices,
    gen,
)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("T", [1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reptile_update_matches_reference(backend, device, T, dtype):
    g = gen(11)
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
@pytest.mark.parametrize("epsilon", [float("nan"), -1.0, 0.0, 5.0, 1.0 + 1e-9, float("inf"), -float("inf")], ids=str)
def test_reptile_update_epsilon_checked(backend, device, epsilon):
    theta = [torch.randn(4, device=device)]
    before = theta[0].clone()
    with pytest.raises(ValueError, match=r"epsilon must be finite and in \(0, 1\], got "):
        mk.reptile_update_(theta, [torch.randn(3, 4, device=device)], epsilon, backend=backend)
    assert torch.equal(theta[0], before)  # refused before anything is written


@pytest.mark.parametrize("backend,device", backend_devices())
def test_reptile_update_epsilon_one_is_the_mean(backend, device):
    theta, phi = [torch.randn(4, device=device)], [torch.randn(3, 4, device=device)]
    mk.reptile_update_(theta, phi, 1.0, backend=backend)
    torch.testing.assert_close(theta[0], phi[0].mean(0))
