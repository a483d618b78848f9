"""MAML++: LSLR, MSL, derivative-order annealing, BN modes, their checkpointing and errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meta_kernels.config import ConfigError, MAMLConfig, MAMLPlusPlusConfig, MetaLearningFullConfig
from meta_kernels.meta import InnerLoopSettings, MetaLearner, TaskModel, adapt, adapt_tasks, meta_loss
from meta_kernels.meta.mamlpp import LSLR_MAX, LSLR_MIN, msl_weights
from meta_kernels.models import Conv4

F64 = torch.float64


def _tasks(T=2, n_way=3, k=2, q=3, size=16, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n_way * k, 1, size, size, generator=g, dtype=dtype)
    xq = torch.randn(T, n_way * q, 1, size, size, generator=g, dtype=dtype)
    return (xs, torch.arange(n_way).repeat_interleave(k).repeat(T, 1), xq,
            torch.arange(n_way).repeat_interleave(q).repeat(T, 1))


def _conv4(bn_steps=1, seed=0):
    torch.manual_seed(seed)
    model = Conv4(in_channels=1, n_way=3, filters=4, image_size=16, bn_steps=bn_steps).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bn." in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_lslr_gradient_matches_finite_differences():
    model = _conv4()
    batch = _tasks()
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.3, inner_clip=None, engine="custom")
    params = dict(model.named_parameters())
    table = torch.rand(2, len(params), dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.1
    table.requires_grad_()
    (grad,) = torch.autograd.grad(meta_loss(params, batch, config=cfg, model=model, lrs=table, track_curve=False).loss,
                                  table)
    direction = torch.randn(table.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    eps = 1e-6
    with torch.no_grad():
        f = lambda t: meta_loss(params, batch, config=cfg, model=model, lrs=t, track_curve=False).loss
        numeric = (f(table + eps * direction) - f(table - eps * direction)) / (2 * eps)
    assert abs(float(numeric - (grad * direction).sum())) < 1e-7


def test_lslr_rates_stay_in_clamp_range_and_are_trained():
    model = _conv4().float()
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.5, inner_clip=None, engine="custom", meta_lr=10.0)  # absurd meta lr
    learner = MetaLearner(model, cfg, mamlpp=MAMLPlusPlusConfig(use_lslr=True, bn_mode="transductive"))
    start = learner.lslr.detach().clone()
    for _ in range(3):
        learner.step(tuple(t.float() if t.is_floating_point() else t for t in _tasks()))
        lo, hi = (float(torch.tensor(v, dtype=learner.lslr.dtype)) for v in (LSLR_MIN, LSLR_MAX))
        assert float(learner.lslr.min()) >= lo and float(learner.lslr.max()) <= hi
    assert not torch.equal(start, learner.lslr.detach())


def test_lslr_takes_its_own_meta_learning_rate():
    """mamlpp.lslr_meta_lr: the table is a second group of the meta-optimizer at that rate (Adam's
    first step moves each entry by its lr), the weights keep maml.meta_lr."""
    model = _conv4().float()
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.3, inner_clip=None, meta_lr=1e-4)
    learner = MetaLearner(model, cfg, mamlpp=MAMLPlusPlusConfig(use_lslr=True, lslr_meta_lr=0.01,
                                                                 bn_mode="transductive"))
    assert [g["lr"] for g in learner.optimizer.param_groups] == [1e-4, 0.01]
    start, weights = learner.lslr.detach().clone(), [p.detach().clone() for p in model.parameters()]
    learner.step(tuple(t.float() if t.is_floating_point() else t for t in _tasks()))
    assert abs(float((learner.lslr - start).abs().max()) - 0.01) < 1e-4
    assert max(float((p - w).abs().max()) for p, w in zip(model.parameters(), weights)) < 1.1e-4
    with pytest.raises(ValueError, match="lslr_meta_lr: is the LSLR table's meta learning rate"):
        MAMLPlusPlusConfig(lslr_meta_lr=0.01)


def test_msl_weightings_and_schedule():
    w = msl_weights("uniform", 5, epoch=0)
    torch.testing.assert_close(w, torch.full((5,), 0.2))
    later = msl_weights("uniform", 5, epoch=5, decay_epochs=10)
    assert later[-1] > 0.2 and all(later[:-1] < 0.2) and abs(float(later.sum()) - 1) < 1e-6
    final = msl_weights("uniform", 5, epoch=100, decay_epochs=10)
    torch.testing.assert_close(final[:-1], torch.full((4,), 0.03 / 5))
    assert abs(float(final.sum()) - 1) < 1e-6
    lin = msl_weights("linear_increase", 4)
    torch.testing.assert_close(lin, torch.tensor([1, 2, 3, 4.0]) / 10)
    logits = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    learned = msl_weights("learned", 3, logits=logits)
    assert (learned > 0).all() and abs(float(learned.sum()) - 1) < 1e-6
    learned[0].backward()
    assert logits.grad.abs().sum() > 0


def test_msl_schedule_ends_with_the_last_step_loss_alone():
    """After msl_decay_epochs the uniform schedule drops the intermediate query losses (the
    paper's code): the step is then plain MAML's, with LSLR; learned weights stay on."""
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.3, inner_clip=None, engine="custom", meta_lr=0.01)

    def learners():
        return (MetaLearner(_conv4(), cfg, mamlpp=MAMLPlusPlusConfig(use_msl=True, use_lslr=True, msl_decay_epochs=2,
                                                                    bn_mode="transductive")),
                MetaLearner(_conv4(), cfg, mamlpp=MAMLPlusPlusConfig(use_lslr=True, bn_mode="transductive")))

    def gap_after_one_step(epoch):
        with_msl, without = learners()
        for learner in (with_msl, without):
            learner.step(_tasks(), epoch=epoch)
        return max(float((a - b).abs().max()) for a, b in zip(with_msl.model.parameters(), without.model.parameters()))

    with_msl, _ = learners()
    assert with_msl.current_msl_weights(1) is not None and with_msl.current_msl_weights(2) is None
    assert gap_after_one_step(1) > 1e-6
    assert gap_after_one_step(2) < 1e-12
    learned = MetaLearner(_conv4(), cfg, mamlpp=MAMLPlusPlusConfig(use_msl=True, msl_weights="learned",
                                                                   msl_decay_epochs=1, bn_mode="transductive"))
    assert learned.current_msl_weights(50) is not None


def test_msl_loss_is_the_weighted_per_step_query_loss():
    model = _conv4()
    xs, ys, xq, yq = _tasks()
    cfg = MAMLConfig(inner_steps=3, inner_lr=0.3, inner_clip=None, engine="custom")
    params = dict(model.named_parameters())
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    loss, _, _ = meta_loss(params, (xs, ys, xq, yq), config=cfg, model=model, msl_weights=w, track_curve=False)
    expected = 0
    for k in range(1, 4):
        adapted, _ = adapt(params, (xs, ys), model=model, steps=k, lrs=0.3, first_order=False)
        q = F.cross_entropy(TaskModel(model)(adapted, xq).reshape(-1, 3), yq.reshape(-1))
        expected = expected + w[k - 1] * q
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_annealing_switches_derivative_order_exactly_at_start_epoch():
    model = _conv4()
    batch = _tasks()
    cfg = MAMLConfig(algo="maml", inner_steps=2, inner_lr=0.3, inner_clip=None, engine="custom")
    learner = MetaLearner(model, cfg, mamlpp=MAMLPlusPlusConfig(use_annealing=True, annealing_start_epoch=3,
                                                                 bn_mode="transductive"))
    assert [learner.first_order_at(e) for e in (0, 2, 3, 4)] == [True, True, False, False]
    params = dict(model.named_parameters())

    def grads(first_order):
        out = meta_loss(params, batch, config=cfg, model=model, first_order=first_order, track_curve=False)
        return torch.autograd.grad(out.loss, list(params.values()))

    fo, so = grads(True), grads(False)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(fo, so))  # the orders really differ here
    for epoch, expected in ((2, fo), (3, so)):
        got = grads(learner.first_order_at(epoch))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _primitive_bn(h, w, b, mean=None, var=None):
    if mean is None:
        mean = h.mean(dim=(0, 2, 3))
        var = h.var(dim=(0, 2, 3), unbiased=False)
    return (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _reference_forward(params, x, step, mode, buffers):
    """One task at a time, BN written with primitive ops, for each mode."""
    outs = []
    for t in range(x.shape[0]):
        h = x[t]
        for i in range(4):
            h = F.conv2d(h, params[f"blocks.{i}.conv.weight"][t], params[f"blocks.{i}.conv.bias"][t], padding=1)
            w, b = params[f"blocks.{i}.bn.weight"][t], params[f"blocks.{i}.bn.bias"][t]
            row = min(step, w.shape[0] - 1) if w.dim() == 2 else 0
            if w.dim() == 2:
                w, b = w[row], b[row]
            if mode == "frozen":
                h = _primitive_bn(h, w, b, buffers[f"blocks.{i}.bn.running_mean"][row],
                                  buffers[f"blocks.{i}.bn.running_var"][row])
            else:
                h = _primitive_bn(h, w, b)
            h = F.max_pool2d(F.relu(h), 2)
        outs.append(F.linear(h.flatten(1), params["head.weight"][t], params["head.bias"][t]))
    return torch.stack(outs)


@pytest.mark.parametrize("mode,bn_steps", [("transductive", 1), ("per_step", 3), ("frozen", 1)])
def test_bn_modes_match_hand_written_reference(mode, bn_steps):
    model = _conv4(bn_steps)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(torch.rand_like(buf) + (0.5 if "var" in name else -0.5))
    xs, ys, xq, yq = _tasks(T=3)
    T = 3
    params = {k: v.detach().expand(T, *v.shape).clone() for k, v in model.named_parameters()}
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}  # tasks with different weights
    buffers = dict(model.named_buffers())
    for step in range(bn_steps + 1):
        got = TaskModel(model)(params, xq, step=step, bn_mode=mode)
        torch.testing.assert_close(got, _reference_forward(params, xq, step, mode, buffers), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["transductive", "per_step"])
def test_no_statistics_leak_across_tasks(mode):
    """A task's adapted output is the same whether it adapts alone or beside other tasks."""
    model = _conv4(3 if mode == "per_step" else 1)
    xs, ys, xq, yq = _tasks(T=3, seed=4)
    params = dict(model.named_parameters())
    together, _ = adapt(params, (xs, ys), model=model, steps=2, lrs=0.3, first_order=True, bn_mode=mode)
    for t in range(3):
        alone, _ = adapt(params, (xs[t:t + 1], ys[t:t + 1]), model=model, steps=2, lrs=0.3, first_order=True, bn_mode=mode)
        for k in params:
            torch.testing.assert_close(together[k][t], alone[k][0], rtol=1e-10, atol=1e-12)


def test_frozen_mode_keeps_bn_affine_fixed_in_the_inner_loop():
    model = _conv4()
    xs, ys, _, _ = _tasks()
    params = dict(model.named_parameters())
    adapted, _ = adapt(params, (xs, ys), model=model, steps=2, lrs=0.3, first_order=True, bn_mode="frozen")
    for k, v in adapted.items():
        changed = not torch.allclose(v[0], params[k])
        assert changed == (".bn." not in k), k


def test_training_updates_and_evaluation_never_changes_running_statistics(tmp_path, monkeypatch):
    from tests.conftest_data import shared_data_dir
    from meta_kernels.train import Trainer
    data = shared_data_dir()
    if data is None:
        pytest.skip("real Omniglot not found")
    monkeypatch.setenv("META_KERNELS_DATA", str(data))
    monkeypatch.setenv("META_KERNELS_CACHE", str(tmp_path / "cache"))
    cfg = MetaLearningFullConfig.minimal().with_overrides(
        ["mamlpp.bn_mode=per_step", "mamlpp.use_lslr=true", "mamlpp.use_msl=true", "mamlpp.msl_weights=learned",
         "run.val_every=100", "checkpoint.every_steps=1"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.model.named_buffers()}
    trainer.evaluate("val", 4)
    for k, v in trainer.model.named_buffers():
        assert torch.equal(v, before[k]), k  # evaluation left them alone
    trainer.fit(max_steps=2)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.named_buffers())  # training folded stats in
    lslr, msl = trainer.learner.lslr.detach().clone(), trainer.learner.msl_logits.detach().clone()
    resumed = Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    assert torch.equal(resumed.learner.lslr.detach(), lslr) and torch.equal(resumed.learner.msl_logits.detach(), msl)


def test_per_step_bn_trains_every_row_under_maml_and_is_refused_under_first_order():
    """Each inner step's BN row reaches the query loss only through the inner updates: MAML's
    second-order meta-gradient trains every row, a first-order one would leave the inner steps'
    rows at their initial values (the query's row alone learning), so that combination is refused."""
    batch = tuple(t.float() if t.is_floating_point() else t for t in _tasks())
    model = _conv4(3).float()
    learner = MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.4, inner_clip=None, engine="custom"),
                          mamlpp=MAMLPlusPlusConfig(bn_mode="per_step"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".bn." in n}
    learner.step(batch)
    for n, p in model.named_parameters():
        if ".bn." in n:
            assert bool(((p.detach() - before[n]).abs().amax(dim=1) > 0).all()), n  # rows 0, 1 (inner), 2 (query)
    for algo in ("fomaml", "reptile"):
        with pytest.raises(ValueError, match=rf"under {algo} \(first order\) the inner steps' rows get no meta-gradient"):
            MetaLearner(_conv4(3), MAMLConfig(algo=algo, inner_steps=2), mamlpp=MAMLPlusPlusConfig(bn_mode="per_step"))
        with pytest.raises(ConfigError, match=r"mamlpp.bn_mode: 'per_step' learns a BatchNorm row per inner step"):
            MetaLearningFullConfig().with_overrides([f"maml.algo={algo}", "mamlpp.bn_mode=per_step"])
        MetaLearningFullConfig().with_overrides([f"maml.algo={algo}", "mamlpp.bn_mode=transductive"])


def test_mamlpp_bad_input():
    with pytest.raises(ConfigError, match=r"msl_weights: unknown weighting 'cubic'"):
        MAMLPlusPlusConfig(msl_weights="cubic")
    with pytest.raises(ConfigError, match=r"bn_mode: unknown bn_mode 'batch'"):
        MAMLPlusPlusConfig(bn_mode="batch")
    with pytest.raises(ConfigError, match=r"annealing_start_epoch: must be an integer >= 0, got -1"):
        MAMLPlusPlusConfig(annealing_start_epoch=-1)
    with pytest.raises(ValueError, match=r"Conv4\(\.\.\., bn_steps=3\)"):
        MetaLearner(_conv4(1), MAMLConfig(inner_steps=2), mamlpp=MAMLPlusPlusConfig(bn_mode="per_step"))
    with pytest.raises(ValueError, match=r"needs StepBatchNorm layers"):
        MetaLearner(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), MAMLConfig(), mamlpp=MAMLPlusPlusConfig(bn_mode="frozen"))
    a = MetaLearner(_conv4(), MAMLConfig(inner_steps=2), mamlpp=MAMLPlusPlusConfig(use_lslr=True, bn_mode="transductive"))
    b = MetaLearner(_conv4(), MAMLConfig(inner_steps=3), mamlpp=MAMLPlusPlusConfig(use_lslr=True, bn_mode="transductive"))
    with pytest.raises(ValueError, match=r"checkpoint lslr \[2, 18\] does not match this learner's \[3, 18\]"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"msl_weights must be \[2\]"):
        adapt_tasks(dict(_conv4().named_parameters()), _tasks()[:2], model=_conv4(),
                    settings=InnerLoopSettings(steps=2, first_order=True), lrs=0.1, msl_weights=torch.ones(3),
                    query_batch=_tasks()[2:])
