"""Implicit MAML: the meta-gradient equals (I + H / (lambda + damping))^-1 grad L_query(phi*) with phi* the
solved proximal inner problem and H the dense Hessian (float64); that formula itself equals finite
differences of the solved inner problem; the inner loop keeps no graph, so memory does not grow with
its steps."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import meta_kernels as mk
from meta_kernels.meta import meta_backward
from meta_kernels.meta.imaml import conjugate_gradient

F64 = torch.float64
LAM, LR = 4.0, 0.1


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def batch(T=2, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(T, n, 3, generator=g, dtype=F64)
    y = lambda: torch.randint(0, 2, (T, n), generator=g)
    return x(), y(), x(), y()


def flat(params):
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def solve_inner(model, theta, x, y, steps=300):
    """phi* = argmin L_support(phi) + LAM / 2 |phi - theta|^2, by plain gradient descent to convergence."""
    phi = theta.clone()
    names = dict(model.named_parameters())
    for _ in range(steps):
        phi = phi.detach().requires_grad_()
        loss = F.cross_entropy(functional_call(model, unflat(phi, names), (x,)), y)
        (g,) = torch.autograd.grad(loss, phi)
        phi = phi - LR * (g + LAM * (phi - theta))
    return phi.detach()


def query_loss(model, phi, x, y):
    return F.cross_entropy(functional_call(model, unflat(phi, dict(model.named_parameters())), (x,)), y)


def exact_implicit_gradient(model, theta, xs, ys, xq, yq, damping=0.0):
    phi = solve_inner(model, theta, xs, ys)
    names = dict(model.named_parameters())
    support = lambda p: F.cross_entropy(functional_call(model, unflat(p, names), (xs,)), ys)
    hessian = torch.autograd.functional.hessian(support, phi)
    (g_query,) = torch.autograd.grad(query_loss(model, phi.requires_grad_(), xq, yq), phi)
    return torch.linalg.solve(torch.eye(len(phi), dtype=F64) + hessian / (LAM + damping), g_query), phi


def test_the_exact_formula_matches_finite_differences_of_the_solved_inner_problem():
    model = small_mlp()
    xs, ys, xq, yq = batch(T=1)
    theta = flat(dict(model.named_parameters())).detach()
    exact, _ = exact_implicit_gradient(model, theta, xs[0], ys[0], xq[0], yq[0])
    eps = 1e-5
    for j in range(0, len(theta), 3):  # every third coordinate keeps the test short
        e = torch.zeros_like(theta)
        e[j] = eps
        up = query_loss(model, solve_inner(model, theta + e, xs[0], ys[0]), xq[0], yq[0])
        down = query_loss(model, solve_inner(model, theta - e, xs[0], ys[0]), xq[0], yq[0])
        assert float((up - down) / (2 * eps)) == pytest.approx(float(exact[j]), abs=1e-7, rel=1e-5)


@pytest.mark.parametrize("damping", [0.0, 3.0])
def test_the_meta_gradient_is_the_implicit_one_for_every_task(damping):
    model = small_mlp()
    xs, ys, xq, yq = batch(T=2)
    params = dict(model.named_parameters())
    theta = flat(params).detach()
    n = len(theta)
    config = mk.MAMLConfig(algo="imaml", inner_steps=300, inner_lr=LR, imaml_lambda=LAM, imaml_cg_steps=n + 5,
                           imaml_damping=damping, inner_clip=None)
    metrics = meta_backward(params, (xs, ys, xq, yq), config=config, model=model)
    ours = flat({k: p.grad for k, p in params.items()})
    exact = sum(exact_implicit_gradient(model, theta, xs[t], ys[t], xq[t], yq[t], damping)[0] for t in range(2)) / 2
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=1e-6)
    assert math.isfinite(metrics["query_loss"])


def test_conjugate_gradient_solves_each_task_system():
    g = torch.Generator().manual_seed(3)
    T, n = 3, 7
    m = torch.randn(T, n, n, generator=g, dtype=F64)
    a = m @ m.transpose(1, 2) + n * torch.eye(n, dtype=F64)  # symmetric positive definite per task
    b = torch.randn(T, n, generator=g, dtype=F64)
    x = conjugate_gradient(lambda v: [torch.einsum("tij,tj->ti", a, v[0])], [b], steps=n)
    torch.testing.assert_close(x[0], torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)


def test_metalearner_trains_with_imaml_and_its_inner_loop_keeps_no_graph(monkeypatch):
    from meta_kernels.meta import algorithms
    seen = []
    real = algorithms.implicit_meta_gradient

    def spy(task_model, adapted, *args):
        seen.append(all(w.grad_fn is None for w in adapted.values()))  # the inner loop left no graph
        return real(task_model, adapted, *args)
    monkeypatch.setattr(algorithms, "implicit_meta_gradient", spy)
    model = mk.Conv4(in_channels=1, n_way=3, filters=4, image_size=16)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, 1, 16, 16, generator=g)
    y = torch.arange(3).repeat_interleave(2).repeat(2, 1)
    learner = mk.MetaLearner(model, mk.MAMLConfig(algo="imaml", inner_steps=3, inner_lr=0.1, imaml_lambda=2.0,
                                                  imaml_cg_steps=3, inner_clip=None))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = learner.step((x, y, x, y), track_curve=True)
    assert math.isfinite(metrics["query_loss"]) and not math.isnan(metrics["auac"]) and seen == [True]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_imaml_refuses_what_it_cannot_do():
    model = small_mlp()
    params = dict(model.named_parameters())
    config = mk.MAMLConfig(algo="imaml", inner_steps=2, inner_lr=0.1)
    with pytest.raises(ValueError, match="use meta_backward or MetaLearner.step"):
        mk.meta_loss(params, batch(), config=config, model=model)
    with pytest.raises(ValueError, match=r"every trained parameter must be adapted: \['2.weight', '2.bias'\]"):
        meta_backward(params, batch(), config=config, model=model, adapt_params=["0.weight", "0.bias"])
    with pytest.raises(ValueError, match="imaml_lambda: must be > 0"):
        mk.MAMLConfig(algo="imaml", imaml_lambda=0.0)
    with pytest.raises(ValueError, match="imaml_damping: must be >= 0"):
        mk.MAMLConfig(algo="imaml", imaml_damping=-1.0)
