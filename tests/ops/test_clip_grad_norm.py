"""clip_grad_norm on every backend: norm and factor against the float64 reference and torch's own
clip_grad_norm_, non-finite norms, gradcheck / gradgradcheck (alone and feeding sgd_step), bad input."""
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
@pytest.mark.parametrize("T", [1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_norm_matches_reference(backend, device, shapes, T, dtype):
    _, grads = tensor_lists(SHAPE_SETS[shapes], T, dtype, device, seed=7)
    max_norm = 2.0
    norm, factor = mk.clip_grad_norm(grads, max_norm, backend=backend)
    assert norm.shape == (T,) and factor.shape == (T,)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch_norm, torch_factor = reference.clip_grad_norm(grads, max_norm, 1e-6)
    true_norm, true_factor = reference.clip_grad_norm(as_float64(grads), max_norm, 1e-6)
    # The reference sums in the storage dtype; ours accumulates in fp32 at least.
    assert_no_worse_than_torch(norm, torch_norm, true_norm, torch.float32 if dtype == torch.bfloat16 else dtype,
                               what="norm")
    assert_no_worse_than_torch(factor, torch_factor, true_factor, torch.float32 if dtype == torch.bfloat16 else dtype,
                               what="factor")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_norm_of_strided_gradients(backend, device, dtype):
    """Each task's block read as it lies (a bmm's transposed weight gradient), and layouts whose
    tasks interleave in memory, are sliced, or broadcast (copied first): the reference's norms."""
    T = 6
    g = lambda *s, seed: torch.randn(*s, generator=gen(seed), dtype=torch.float64).to(device, dtype)
    grads = [g(T, 13, 7, seed=1).transpose(1, 2),                 # tasks in blocks, transposed inside
             g(9, T, 4, seed=2).transpose(0, 1),                  # tasks interleaved
             g(T, 10, 6, seed=3)[:, ::2],                         # sliced
             g(1, 5, seed=4).expand(T, 5),                        # broadcast over the tasks
             g(T, 3, seed=5)]
    norm, factor = mk.clip_grad_norm(grads, 2.0, backend=backend)
    torch_norm, torch_factor = reference.clip_grad_norm(grads, 2.0, 1e-6)
    true_norm, true_factor = reference.clip_grad_norm(as_float64(grads), 2.0, 1e-6)
    kind = torch.float32 if dtype == torch.bfloat16 else dtype
    assert_no_worse_than_torch(norm, torch_norm, true_norm, kind, what="norm")
    assert_no_worse_than_torch(factor, torch_factor, true_factor, kind, what="factor")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_against_torch_clip(backend, device):
    """Per task, the factor equals what torch.nn.utils.clip_grad_norm_ applies."""
    _, grads = tensor_lists(SHAPE_SETS["mixed"], 4, torch.float64, device, seed=8)
    norm, factor = mk.clip_grad_norm(grads, 3.0, backend=backend)
    for t in range(4):
        task = [torch.zeros_like(g[t], requires_grad=True) for g in grads]
        for p, g in zip(task, grads):
            p.grad = g[t].clone()
        total = torch.nn.utils.clip_grad_norm_(task, 3.0, foreach=False)
        torch.testing.assert_close(norm[t], total.to(norm.dtype))
        torch.testing.assert_close(task[0].grad, grads[0][t] * factor[t])


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_non_finite(backend, device):
    """Documented behaviour: a non-finite norm is returned as is and its factor is NaN; other
    tasks are unaffected."""
    _, grads = tensor_lists(SHAPE_SETS["mixed"], 3, torch.float32, device, seed=9)
    grads[0][0, 5] = float("inf")
    grads[2][2, 0, 0] = float("nan")
    norm, factor = mk.clip_grad_norm(grads, 1.0, backend=backend)
    assert torch.isinf(norm[0]) and torch.isnan(factor[0])
    assert torch.isfinite(norm[1]) and torch.isfinite(factor[1])
    assert torch.isnan(norm[2]) and torch.isnan(factor[2])


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

    check_grad_and_gradgrad(fn, tuple(grads))


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

    check_grad_and_gradgrad(fn, (params[0], grads[0], lrs))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_bad_input(backend, device):
    _, g = small_lists(device)
    with pytest.raises(ValueError, match=r"grads is empty"):
        mk.clip_grad_norm([], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"max_norm must be > 0"):
        mk.clip_grad_norm(g, 0.0, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] has 4 tasks in dim 0 but grads\[0\] has 3"):
        mk.clip_grad_norm([g[0], torch.randn(4, 2, device=device)], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[0\] is 0-dim"):
        mk.clip_grad_norm([torch.tensor(1.0, device=device)], 1.0, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("max_norm,eps,match", [
    (1.0, -1e-6, r"eps must be finite and > 0, got -1e-06"),
    (1.0, 0.0, r"eps must be finite and > 0, got 0.0"),
    (1.0, float("nan"), r"eps must be finite and > 0, got nan"),
    (1.0, float("inf"), r"eps must be finite and > 0, got inf"),
    (float("nan"), 1e-6, r"max_norm must be > 0 \(inf: no clipping\), got nan"),
    (-1.0, 1e-6, r"max_norm must be > 0 \(inf: no clipping\), got -1.0"),
])
def test_clip_grad_norm_scalar_checks(backend, device, max_norm, eps, match):
    _, g = small_lists(device)
    with pytest.raises(ValueError, match=match):
        mk.clip_grad_norm(g, max_norm, eps, backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_norm_infinite_max_norm_gives_the_norm_alone(backend, device):
    """max_norm = inf stays allowed: the inner loop asks for the norms that way (factor 1)."""
    _, g = small_lists(device)
    norm, factor = mk.clip_grad_norm(g, float("inf"), backend=backend)
    torch.testing.assert_close(norm, torch.stack([torch.cat([t[i].flatten() for t in g]).norm() for i in range(3)]))
    assert bool((factor == 1).all())
