"""The core inner loop's factored Linear steps (meta/inner.py, meta/factored.py): plain SGD holds
wide Linear weights as base - gᵀ x. Everything a step gives -- the meta-objective, the
meta-gradients (of the weights, of a learned rate table), the inner logs, the adapted weights when
read -- equals the loop with every weight a [T, *shape] tensor (inner.FACTORED = False), in float64."""
import math

import pytest
import torch
from torch import nn

import meta_kernels as mk
from meta_kernels.meta import inner
from meta_kernels.meta.algorithms import meta_loss
from meta_kernels.meta.factored import _Placeholder

F64 = torch.float64
WIDE = ("1.weight", "4.weight")  # 96 x 64 and 80 x 96: rank limits 38 and 43 (>= 32: factored)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.BatchNorm1d(96), nn.ReLU(), nn.Linear(96, 80), nn.Tanh(),
                         nn.Linear(80, 5)).double()


def batch(T=3, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(T, n, 1, 8, 8, generator=g, dtype=F64)
    y = lambda: torch.randint(0, 5, (T, n), generator=g)
    return x(), y(), x(), y()


def step(factored: bool, monkeypatch, net, data, config, **kwargs):
    """meta_loss and its backward: (loss, meta-gradients of the weights and of tensors in kwargs, logs)."""
    monkeypatch.setattr(inner, "FACTORED", factored)
    params = dict(net.named_parameters())
    for p in params.values():
        p.grad = None
    out = meta_loss(params, data, config=config, model=net, **kwargs)
    leaves = list(params.values()) + [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return out.loss.detach(), grads, out.logs.inner


def assert_same_step(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    assert len(a[2]) == len(b[2])
    for la, lb in zip(a[2], b[2]):  # the logs hold float32 rates
        for field in ("loss", "accuracy", "grad_norm", "update_norm", "clip_factor"):
            assert getattr(la, field) == pytest.approx(getattr(lb, field), rel=1e-6, nan_ok=True), field


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_factored_step_equals_the_dense_one(monkeypatch, algo, steps, clip):
    net, data = model(), batch()
    config = mk.MAMLConfig(algo=algo, inner_steps=steps, inner_lr=0.3, inner_clip=clip)
    assert_same_step(step(False, monkeypatch, net, data, config), step(True, monkeypatch, net, data, config))


def test_a_learned_rate_table_and_the_multi_step_loss(monkeypatch):
    """MAML++'s per-step, per-weight rates (requiring grad) and the query loss after every step."""
    net, data = model(), batch()
    n = len(list(net.parameters()))
    config = mk.MAMLConfig(algo="maml", inner_steps=3, inner_lr=0.3, inner_clip=None)
    table = (0.1 + 0.05 * torch.arange(3 * n, dtype=F64).reshape(3, n)).requires_grad_()
    msl = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    a = step(False, monkeypatch, net, data, config, lrs=table, msl_weights=msl)
    b = step(True, monkeypatch, net, data, config, lrs=table, msl_weights=msl)
    assert b[1][-1] is not None and b[1][-1].abs().sum() > 0  # the table's own meta-gradient
    assert_same_step(a, b)


def test_a_skipped_task_and_a_subset_of_adapted_weights(monkeypatch):
    net = model()
    xs, ys, xq, yq = batch()
    xs[1, 2] = math.nan  # task 1's inner loss is NaN: skipped, the others step
    config = mk.MAMLConfig(algo="maml", inner_steps=2, inner_lr=0.3, inner_clip=None, skip_nonfinite_tasks=True)
    subset = [k for k, _ in net.named_parameters() if k != WIDE[0]]  # the first wide weight not adapted
    a = step(False, monkeypatch, net, (xs, ys, xq, yq), config, adapt_params=subset)
    b = step(True, monkeypatch, net, (xs, ys, xq, yq), config, adapt_params=subset)
    assert all(math.isfinite(float(g.abs().sum())) for g in b[1])
    assert_same_step(a, b)


def test_past_its_rank_limit_a_weight_is_formed_and_stays_exact(monkeypatch):
    """20 samples per step: the 96 x 64 weight's factors (rank 40 after two steps) would hold more
    than the weight (limit 38), so it is formed there; the 80 x 96 one (limit 43) only at step 3."""
    net, data = model(), batch(n=20)
    config = mk.MAMLConfig(algo="maml", inner_steps=3, inner_lr=0.3, inner_clip=None)
    assert_same_step(step(False, monkeypatch, net, data, config), step(True, monkeypatch, net, data, config))


def test_the_adapted_weights_are_held_factored_and_formed_when_read(monkeypatch):
    net = model()
    xs, ys, _, _ = batch()
    params = dict(net.named_parameters())
    adapted = {}
    for factored in (False, True):
        monkeypatch.setattr(inner, "FACTORED", factored)
        adapted[factored], _ = mk.adapt(params, (xs, ys), model=net, steps=2, lrs=0.3, first_order=False)
    held = adapted[True]
    assert {k for k, v in held.items() if isinstance(v, _Placeholder)} == set(WIDE)
    for k, v in adapted[False].items():
        assert held[k].shape == v.shape and held[k].requires_grad
        torch.testing.assert_close(held[k] * 1, v, rtol=1e-12, atol=1e-12)  # any use but the Linear forms it
        torch.testing.assert_close(held[k][2], v[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["adam", "meta_sgd", "no_graph", "switched_off"])
def test_loops_that_need_each_gradient_whole_keep_tensors(monkeypatch, case):
    net = model()
    xs, ys, _, _ = batch()
    params = dict(net.named_parameters())
    monkeypatch.setattr(inner, "FACTORED", case != "switched_off")
    kwargs = dict(model=net, steps=2, lrs=0.3, first_order=False)
    if case == "adam":
        kwargs["inner_optimizer"] = "adam"
    if case == "meta_sgd":
        kwargs["lrs"] = {k: torch.full_like(p, 0.3) for k, p in params.items()}
    if case == "no_graph":
        kwargs["no_graph"] = True
    adapted, _ = mk.adapt(params, (xs, ys), **kwargs)
    assert not any(isinstance(v, _Placeholder) for v in adapted.values())


def test_a_learner_step_with_the_default_config_equals_the_dense_one(monkeypatch):
    """MetaLearner, MAMLConfig's defaults (clipping at norm 10): the weights after two outer steps."""
    data = batch()
    after = []
    for factored in (False, True):
        monkeypatch.setattr(inner, "FACTORED", factored)
        net = model()
        learner = mk.MetaLearner(net, mk.MAMLConfig(algo="maml", inner_steps=2, inner_lr=0.4))
        for _ in range(2):
            learner.step(data)
        after.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*after):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_model_reading_its_wide_weight_itself_runs_its_tasks_in_a_loop(monkeypatch):
    """Its forward reads the weight outside the layer (loop mode): no factoring, the same step."""

    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(64, 96), nn.Linear(96, 5)

        def forward(self, x):
            h = torch.relu(x.flatten(1) @ self.body.weight.t() + self.body.bias)
            return self.head(h)

    data = batch()
    config = mk.MAMLConfig(algo="maml", inner_steps=2, inner_lr=0.3, inner_clip=None)
    results = []
    for factored in (False, True):
        torch.manual_seed(0)
        net = ReadsWeight().double()
        with pytest.warns(UserWarning, match="reads body.weight itself"):
            results.append(step(factored, monkeypatch, net, data, config))
    assert_same_step(*results)
