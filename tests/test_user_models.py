"""A user's own nn.Module through the public API (meta_loss, meta_backward, MetaLearner, MAML):
meta-gradients equal a per-task loop written here (float64) on models the engine batches, with
any loss callable (soft targets, regression), frozen parameters, and a selected subset adapted
(ANIL / BOIL); bad input gets a clear error."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import meta_kernels as mk
from meta_kernels.models import ResNet12
from tests.test_batching import seq_conv4

F64 = dict(dtype=torch.float64)
T, STEPS, LR = 3, 2, 0.1


def _mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _frozen_body():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    return model


MODELS = {"seq_conv4": (lambda: seq_conv4(filters=4, n_way=3), (1, 28, 28)),
          "resnet12": (lambda: ResNet12(widths=(3, 4, 4, 5), n_way=3), (3, 16, 16)),
          "mlp": (_mlp, (4,)), "frozen_body": (_frozen_body, (4,))}


def _batch(shape, seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(T, n, *shape, generator=g, **F64), torch.randn(T, n, *shape, generator=g, **F64)
    ys, yq = torch.randint(0, 3, (T, n), generator=g), torch.randint(0, 3, (T, n), generator=g)
    return xs, ys, xq, yq


def _loop_meta_gradient(model, batch, loss_fn, first_order, adapted):
    """The meta-gradient of the mean query loss, task by task."""
    xs, ys, xq, yq = batch
    params = dict(model.named_parameters())
    total = 0
    for t in range(T):
        fast = dict(params)
        for _ in range(STEPS):
            loss = loss_fn(functional_call(model, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, [fast[k] for k in adapted], create_graph=not first_order)
            fast.update({k: fast[k] - LR * g for k, g in zip(adapted, grads)})
        total = total + loss_fn(functional_call(model, fast, (xq[t],)), yq[t]) / T
    leaves = [p for p in params.values() if p.requires_grad]
    return torch.autograd.grad(total, leaves)


def _ours(model, batch, algo, engine, **kw):
    cfg = mk.MAMLConfig(algo=algo, inner_steps=STEPS, inner_lr=LR, inner_clip=None, engine=engine)
    params = dict(model.named_parameters())
    out = mk.meta_loss(params, batch, config=cfg, model=model, track_curve=False, **kw)
    leaves = [p for p in params.values() if p.requires_grad]
    return torch.autograd.grad(out.loss, leaves)


def _assert_equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item()), f"{what}[{i}]"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("algo", ["maml", "fomaml"])
@pytest.mark.parametrize("engine", ["custom", "torch_func"])
def test_meta_gradient_of_a_user_model_equals_the_loop(name, algo, engine):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    batch = _batch(shape)
    adapted = [k for k, v in model.named_parameters() if v.requires_grad]
    got = _ours(model, batch, algo, engine)
    want = _loop_meta_gradient(model, batch, F.cross_entropy, algo == "fomaml", adapted)
    _assert_equal(got, want, f"{name} {algo} {engine}")


@pytest.mark.parametrize("subset", ["anil", "boil"])
def test_adapting_a_subset_keeps_the_meta_gradient_of_the_rest(subset):
    torch.manual_seed(0)
    model = _mlp().double()
    batch = _batch((4,))
    head = lambda name, _: name.startswith("2.")
    rule = head if subset == "anil" else (lambda name, p: not head(name, p))
    adapted = [k for k, v in model.named_parameters() if rule(k, v)]
    got = _ours(model, batch, "maml", "custom", adapt_params=rule)
    want = _loop_meta_gradient(model, batch, F.cross_entropy, False, adapted)
    _assert_equal(got, want, subset)
    assert all(g.abs().max() > 0 for g in got), "parameters that are not adapted still get a meta-gradient"
    names = ["2.weight", "2.bias"] if subset == "anil" else ["0.weight", "0.bias"]
    _assert_equal(_ours(model, batch, "maml", "custom", adapt_params=names), want, f"{subset} by names")


def test_soft_targets_and_a_regression_loss_callable():
    torch.manual_seed(0)
    model = _mlp().double()
    xs, ys, xq, yq = _batch((4,))
    soft = lambda y: F.one_hot(y, 3).double() * 0.8 + 0.2 / 3
    batch = (xs, soft(ys), xq, soft(yq))
    loss_fn = lambda out, target: F.cross_entropy(out, target)
    got = _ours(model, batch, "maml", "custom", loss_fn=loss_fn)
    _assert_equal(got, _loop_meta_gradient(model, batch, loss_fn, False, [k for k, _ in model.named_parameters()]),
                  "soft targets")
    huber = lambda out, target: F.smooth_l1_loss(out, target)
    reg = (xs, torch.randn(T, 6, 3, **F64), xq, torch.randn(T, 6, 3, **F64))
    got = _ours(model, reg, "fomaml", "custom", loss_fn=huber)
    _assert_equal(got, _loop_meta_gradient(model, reg, huber, True, [k for k, _ in model.named_parameters()]), "huber")


def test_metalearner_and_the_maml_wrapper_take_a_loss_callable_and_frozen_parameters():
    torch.manual_seed(0)
    model = _frozen_body().double()
    frozen = model[0].weight.detach().clone()
    batch = _batch((4,))
    learner = mk.MetaLearner(model, mk.MAMLConfig(algo="maml", inner_steps=2, inner_lr=LR, inner_clip=None),
                             loss_fn=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1))
    learner.step(batch)
    assert torch.equal(model[0].weight, frozen), "a frozen parameter is neither adapted nor trained"
    maml = mk.MAML(model, lr=LR, loss=lambda out, y: F.cross_entropy(out, y))
    adapted = maml.adapt(batch[0], batch[1], steps=2)
    assert torch.equal(adapted["0.weight"][0], frozen) and adapted["2.weight"].shape == (T, 3, 8)


def test_a_loss_callable_of_the_wrong_shape_says_what_it_expected():
    model = _mlp().double()
    with pytest.raises(ValueError, match=r"must return a scalar for one task's outputs \[6, 3\].*got \[6\]"):
        _ours(model, _batch((4,)), "maml", "custom", loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))


def test_bad_adapt_params_are_refused():
    model = _mlp().double()
    with pytest.raises(ValueError, match=r"adapt_params names \['head.weight'\], which are not parameters"):
        _ours(model, _batch((4,)), "maml", "custom", adapt_params=["head.weight"])
    with pytest.raises(ValueError, match=r"no parameter is adapted"):
        _ours(model, _batch((4,)), "maml", "custom", adapt_params=lambda name, p: False)


def test_meta_sgd_per_element_rates_get_the_loops_meta_gradient():
    torch.manual_seed(0)
    model = _mlp().double()
    xs, ys, xq, yq = _batch((4,))
    g = torch.Generator().manual_seed(5)
    rates = {k: (0.05 + 0.1 * torch.rand(p.shape, generator=g, **F64)).requires_grad_()
             for k, p in model.named_parameters()}
    params = dict(model.named_parameters())
    cfg = mk.MAMLConfig(algo="maml", inner_steps=STEPS, inner_lr=LR, inner_clip=None, engine="custom")
    out = mk.meta_loss(params, (xs, ys, xq, yq), config=cfg, model=model, lrs=rates, track_curve=False)
    leaves = list(params.values()) + list(rates.values())
    got = torch.autograd.grad(out.loss, leaves)
    total = 0
    for t in range(T):
        fast = dict(params)
        for _ in range(STEPS):
            loss = F.cross_entropy(functional_call(model, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: fast[k] - rates[k] * gr for k, gr in zip(fast, grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t]) / T
    _assert_equal(got, torch.autograd.grad(total, leaves), "meta-sgd")
    learner = mk.MetaLearner(model, cfg, meta_sgd=True)
    before = {k: v.detach().clone() for k, v in learner.meta_sgd_rates.items()}
    learner.step((xs, ys, xq, yq))
    assert all(not torch.equal(before[k], v) for k, v in learner.meta_sgd_rates.items()), "the rates are trained"
    with pytest.raises(ValueError, match=r"the rates of 0.weight must have its shape \[16, 4\]"):
        mk.meta_loss(params, (xs, ys, xq, yq), config=cfg, model=model, lrs={**rates, "0.weight": torch.ones(3)})


def test_several_inputs_one_a_keyword_through_meta_loss_and_metalearner():
    from tests.test_batching import TwoInputs
    torch.manual_seed(0)
    model = TwoInputs().double()
    g = torch.Generator().manual_seed(1)
    inputs = lambda: ((torch.randn(T, 6, 3, generator=g, **F64),), {"tokens": torch.randint(0, 11, (T, 6, 5), generator=g)})
    xs, xq = inputs(), inputs()
    ys, yq = torch.randint(0, 2, (T, 6), generator=g), torch.randint(0, 2, (T, 6), generator=g)
    got = _ours(model, (xs, ys, xq, yq), "maml", "custom")
    params = dict(model.named_parameters())
    total = 0
    for t in range(T):
        fast = dict(params)
        task = lambda x: ((x[0][0][t],), {"tokens": x[1]["tokens"][t]})
        for _ in range(STEPS):
            loss = F.cross_entropy(functional_call(model, fast, *task(xs)), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: fast[k] - LR * gr for k, gr in zip(fast, grads)}
        total = total + F.cross_entropy(functional_call(model, fast, *task(xq)), yq[t]) / T
    _assert_equal(got, torch.autograd.grad(total, list(params.values())), "two inputs")
    cfg = mk.MAMLConfig(algo="fomaml", inner_steps=2, inner_lr=LR, task_chunk=2, query_chunk=1)
    mk.MetaLearner(model, cfg).step((xs, ys, xq, yq))  # chunked tasks and query passes slice every input


@pytest.mark.parametrize("name", ["seq_conv4", "resnet12"])
def test_low_memory_settings_give_the_same_meta_gradient_for_a_user_model(name):
    """task_chunk, query_chunk and recompute_inner (MAML's graph rebuilt one step at a time) on the
    engine: the gradients of meta_loss(...).loss.backward()."""
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    batch = _batch(shape)
    params = dict(model.named_parameters())
    base = mk.MAMLConfig(algo="maml", inner_steps=STEPS, inner_lr=LR, inner_clip=None, engine="custom")
    want = torch.autograd.grad(mk.meta_loss(params, batch, config=base, model=model, track_curve=False).loss,
                               list(params.values()))
    for settings in ({"query_chunk": 1}, {"query_chunk": 2, "recompute_inner": True}):
        mk.meta_backward(params, batch, config=base.replace(**settings), model=model)
        _assert_equal([p.grad for p in params.values()], want, f"{name} {settings}")
        model.zero_grad(set_to_none=True)
