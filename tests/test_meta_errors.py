"""Bad input to the meta-learning layer: clear errors naming what is wrong."""
import math

import pytest
import torch


from meta_kernels.config import ConfigError, MAMLConfig
from meta_kernels.meta import MetaLearner, NonFiniteLossError, adapt, meta_loss
from meta_kernels.models import Conv4


def _batch(T=2, n_way=3, k=1, q=2, size=16):
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(T, n_way * k, 1, size, size, generator=g), torch.randn(T, n_way * q, 1, size, size, generator=g)
    ys = torch.arange(n_way).repeat_interleave(k).repeat(T, 1)
    yq = torch.arange(n_way).repeat_interleave(q).repeat(T, 1)
    return xs, ys, xq, yq


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Conv4(in_channels=1, n_way=3, filters=4, image_size=16)


def test_labels_outside_n_way(model):
    xs, ys, xq, yq = _batch()
    with pytest.raises(ValueError, match=r"support labels must lie in \[0, 3\).*got labels in \[0, 7\]"):
        adapt(dict(model.named_parameters()), (xs, ys * 7 // 2), model=model, steps=1, lrs=0.1, first_order=True)
    with pytest.raises(ValueError, match=r"query labels must lie in \[0, 3\)"):
        meta_loss(dict(model.named_parameters()), (xs, ys, xq, yq - 1), config=MAMLConfig(inner_steps=1), model=model)


def test_empty_support_and_mismatched_tasks(model):
    xs, ys, xq, yq = _batch()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"support set is empty"):
        adapt(params, (xs[:, :0], ys[:, :0]), model=model, steps=1, lrs=0.1, first_order=True)
    with pytest.raises(ValueError, match=r"support has 2 tasks but query has 1"):
        meta_loss(params, (xs, ys, xq[:1], yq[:1]), config=MAMLConfig(inner_steps=1), model=model)
    with pytest.raises(ValueError, match=r"x must be \[T, N, \.\.\.\] and y \[T, N\]"):
        adapt(params, (xs, ys[:, :2]), model=model, steps=1, lrs=0.1, first_order=True)
    with pytest.raises(ValueError, match=r"labels must be integer class indices"):
        adapt(params, (xs, ys.float()), model=model, steps=1, lrs=0.1, first_order=True)


def test_bad_steps_lrs_engine(model):
    xs, ys, _, _ = _batch()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        adapt(params, (xs, ys), model=model, steps=0, lrs=0.1, first_order=True)
    with pytest.raises(ValueError, match=r"inner lr must be > 0"):
        adapt(params, (xs, ys), model=model, steps=1, lrs=-0.1, first_order=True)
    with pytest.raises(ValueError, match=r"lrs must be a float, \[18\].*\[2, 18\]"):
        adapt(params, (xs, ys), model=model, steps=2, lrs=torch.ones(3), first_order=True)
    with pytest.raises(ValueError, match=r"unknown engine 'jax'"):
        adapt(params, (xs, ys), model=model, steps=1, lrs=0.1, first_order=True, engine="jax")


def test_config_conflicts_and_invalid_values():
    with pytest.raises(ConfigError, match=r"MAMLConfig.second_order: True conflicts with algo='fomaml'"):
        MAMLConfig(algo="fomaml", second_order=True)
    with pytest.raises(ConfigError, match=r"MAMLConfig.inner_steps: must be an integer >= 1, got 0"):
        MAMLConfig(inner_steps=0)
    with pytest.raises(ConfigError, match=r"MAMLConfig.algo: unknown algorithm 'mamlpp'"):
        MAMLConfig(algo="mamlpp")
    with pytest.raises(ConfigError, match=r"MAMLConfig.inner_lr: must be > 0"):
        MAMLConfig(inner_lr=-1.0)
    assert MAMLConfig(algo="maml").replace(algo="fomaml").second_order is False


def test_meta_loss_algo_conflicting_with_config(model):
    with pytest.raises(ValueError, match=r"algo='reptile' conflicts with config.algo='maml'"):
        meta_loss(dict(model.named_parameters()), _batch(), algo="reptile", config=MAMLConfig(), model=model)


def test_non_finite_inner_loss_names_step_and_task(model):
    xs, ys, xq, yq = _batch(T=3)
    xs = xs.clone()
    xs[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"inner step 0, before any inner update, for task\(s\) \[1\]"):
        adapt(dict(model.named_parameters()), (xs, ys), model=model, steps=2, lrs=0.1, first_order=True)


def test_non_finite_tasks_can_be_skipped_and_counted(model):
    xs, ys, xq, yq = _batch(T=3)
    xs = xs.clone()
    xs[1, 0, 0, 0, 0] = float("inf")
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.1, skip_nonfinite_tasks=True, engine="custom")
    learner = MetaLearner(model, cfg)
    metrics = learner.step((xs, ys, xq, yq))
    assert metrics["skipped_tasks"] == 1
    assert math.isfinite(metrics["query_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_query_loss(model):
    xs, ys, xq, yq = _batch(T=3)
    xq = xq.clone()
    xq[2, 1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite query loss after adaptation for task\(s\) \[2\]"):
        meta_loss(dict(model.named_parameters()), (xs, ys, xq, yq), config=MAMLConfig(inner_steps=1), model=model)
    cfg = MAMLConfig(inner_steps=1, skip_nonfinite_tasks=True)
    loss, metrics, _ = meta_loss(dict(model.named_parameters()), (xs, ys, xq, yq), config=cfg, model=model)
    loss.backward()
    assert metrics["skipped_tasks"] == 1 and all(torch.isfinite(p.grad).all() for p in model.parameters())


def _infinite_grad_on(param):
    param.register_hook(lambda g: g * math.inf)  # finite losses, an infinite meta-gradient


def test_a_non_finite_meta_gradient_raises_naming_the_step_or_skips_it(model):
    batch = _batch(T=2)
    before = [p.detach().clone() for p in model.parameters()]
    _infinite_grad_on(model.head.bias)
    learner = MetaLearner(model, MAMLConfig(inner_steps=1, inner_lr=0.1, engine="custom"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite meta-gradient at outer step 1 in head\.bias"):
        learner.step(batch)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    learner = MetaLearner(model, MAMLConfig(inner_steps=1, inner_lr=0.1, engine="custom", skip_nonfinite_tasks=True))
    metrics = learner.step(batch)
    assert metrics["skipped_step"] == 1.0 and learner.outer_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not learner.optimizer.state  # Adam did not move either


def test_a_step_with_every_task_skipped_makes_no_update_and_reports_nan(model):
    xs, ys, xq, yq = _batch(T=2)
    before = [p.detach().clone() for p in model.parameters()]
    learner = MetaLearner(model, MAMLConfig(inner_steps=1, inner_lr=0.1, skip_nonfinite_tasks=True, engine="custom"))
    metrics = learner.step((xs * math.nan, ys, xq, yq))
    assert metrics["skipped_tasks"] == 2 and metrics["skipped_step"] == 1.0
    assert math.isnan(metrics["query_loss"]) and math.isnan(metrics["post_adapt_acc"])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not learner.optimizer.state


def test_reptile_averages_only_the_kept_tasks():
    xs, ys, xq, yq = _batch(T=3)
    xs = xs.clone()
    xs[1, 0, 0, 0, 0] = math.nan
    cfg = MAMLConfig(algo="reptile", inner_steps=2, inner_lr=0.1, skip_nonfinite_tasks=True, engine="custom")
    results = []
    for tasks in ([0, 1, 2], [0, 2]):
        torch.manual_seed(0)
        model = Conv4(in_channels=1, n_way=3, filters=4, image_size=16)
        MetaLearner(model, cfg).step((xs[tasks], ys[tasks], xq[tasks], yq[tasks]))
        results.append([p.detach() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
