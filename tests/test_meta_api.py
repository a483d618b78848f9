"""The learn2learn-style wrapper and the compiled meta-step."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meta_kernels as mk
from meta_kernels.config import MAMLConfig
from meta_kernels.meta import MetaLearner


def _data(T=2, n_way=3, k=2, q=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n_way * k, 1, size, size, generator=g)
    xq = torch.randn(T, n_way * q, 1, size, size, generator=g)
    return xs, torch.arange(n_way).repeat_interleave(k).repeat(T, 1), xq, torch.arange(n_way).repeat_interleave(q).repeat(T, 1)


def test_maml_wrapper_single_task_equals_meta_loss():
    torch.manual_seed(0)
    model = mk.Conv4(in_channels=1, n_way=3, filters=4, image_size=16).double()
    xs, ys, xq, yq = (t.double() if t.is_floating_point() else t for t in _data())
    maml = mk.MAML(model, lr=0.3)
    total = 0
    for t in range(2):  # the wrapper, one task at a time
        adapted = maml.adapt(xs[t], ys[t], steps=2)
        assert adapted["head.weight"].shape == model.head.weight.shape
        total = total + F.cross_entropy(maml(xq[t], adapted), yq[t]) / 2
    wrapper_grads = torch.autograd.grad(total, list(model.parameters()))
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.3, inner_clip=None, engine="custom")
    loss, _, _ = mk.meta_loss(dict(model.named_parameters()), (xs, ys, xq, yq), config=cfg, model=model,
                              track_curve=False)
    for a, b in zip(wrapper_grads, torch.autograd.grad(loss, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_maml_wrapper_with_a_user_mlp_batched():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 8), nn.ReLU(), nn.Linear(8, 3))
    xs, ys, xq, yq = _data()
    maml = mk.MAML(model, lr=0.1, first_order=True)
    adapted = maml.adapt(xs, ys, steps=3)
    assert adapted["1.weight"].shape == (2, 8, 256)
    loss = F.cross_entropy(maml(xq, adapted).reshape(-1, 3), yq.reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert len(maml.inner_logs) == 3


@pytest.mark.parametrize("algo", ["fomaml", "maml"])
def test_compiled_meta_step_matches_eager(algo):
    torch._dynamo.reset()
    batch = _data(seed=2)
    results = []
    for compile in (False, True):
        torch.manual_seed(3)
        model = mk.Conv4(in_channels=1, n_way=3, filters=4, image_size=16)
        cfg = MAMLConfig(algo=algo, inner_steps=2, inner_lr=0.3, inner_clip=1.0, engine="custom")
        learner = MetaLearner(model, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), compile=compile)
        learner.step(batch)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_needs_custom_engine():
    with pytest.raises(ValueError, match=r"compile=True needs engine='custom'"):
        MetaLearner(nn.Linear(2, 2), MAMLConfig(engine="torch_func"), compile=True)
