"""Inner optimizers with state (MAMLConfig.inner_optimizer): second-order MAML meta-gradients
equal to higher's differentiable SGD-momentum / Adam run one task at a time (float64, <= 1e-10,
an MLP and a CNN with BatchNorm); LSLR and Meta-SGD rates scale the optimizer's step; the
no-graph paths (FOMAML, Reptile, evaluation) take the same steps; a dead ReLU leaves the
meta-gradient finite; MetaLearner and the config run them."""
import math

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import meta_kernels as mk
from meta_kernels.meta import meta_backward
from meta_kernels.ops import reference

F64 = torch.float64
STEPS, LR = 3, 0.05
# higher's Adam adds eps to sqrt(v) before its bias correction (eps / sqrt(c2) in torch's terms).
# Adam's second-order terms are eps-sensitive (at step 1 the direction is g / (|g| + eps), whose
# derivative is about eps / g^2): eps = 1e-14 already differs by 3e-7, eps = 1e-20 agrees to rounding.
EPS = 1e-20
OPTIMIZERS = {"momentum": (dict(inner_momentum=0.8), lambda p: torch.optim.SGD(p, lr=LR, momentum=0.8)),
              "adam": (dict(inner_betas=(0.5, 0.9), inner_eps=EPS),
                       lambda p: torch.optim.Adam(p, lr=LR, betas=(0.5, 0.9), eps=EPS))}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def tasks(model_name, T=3, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (5,) if model_name == "mlp" else (1, 8, 8)
    x = lambda: torch.randn(T, n, *shape, generator=g, dtype=F64)
    y = lambda: torch.randint(0, 3, (T, n), generator=g)
    return x(), y(), x(), y()


def higher_meta_gradient(model, batch, make_optimizer):
    """Mean over tasks of d L_query(adapted) / d theta, one task at a time, with higher."""
    xs, ys, xq, yq = batch
    total = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(xs.shape[0]):
        with higher.innerloop_ctx(model, make_optimizer(model.parameters()), copy_initial_weights=False,
                                  track_higher_grads=True) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
            grads = torch.autograd.grad(F.cross_entropy(fmodel(xq[t]), yq[t]), list(model.parameters()))
        total = [a + b / xs.shape[0] for a, b in zip(total, grads)]
    return total


def our_meta_gradient(model, batch, config):
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    meta_backward(params, batch, config=config, model=model)
    return [p.grad for p in params.values()]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_second_order_meta_gradient_equals_highers(model_name, optimizer, backend):
    model = mlp() if model_name == "mlp" else cnn()
    batch = tasks(model_name)
    settings, make = OPTIMIZERS[optimizer]
    config = mk.MAMLConfig(algo="maml", inner_steps=STEPS, inner_lr=LR, inner_clip=None, inner_optimizer=optimizer,
                           backend=backend, **settings)
    ours = our_meta_gradient(model, batch, config)
    theirs = higher_meta_gradient(model, batch, make)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def manual_meta_gradient(model, batch, optimizer, lr_table=None, rates=None):
    """Second-order MAML by hand: each task alone, the reference update ops (plain autograd),
    rates per step and tensor (LSLR) or per element (Meta-SGD)."""
    xs, ys, xq, yq = batch
    names = [k for k, _ in model.named_parameters()]
    theta = [p for p in model.parameters()]
    losses = []
    for t in range(xs.shape[0]):
        fast = [p.unsqueeze(0) for p in theta]
        state = [[torch.zeros_like(f) for f in fast] for _ in range(1 if optimizer == "momentum" else 2)]
        for step in range(STEPS):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, [f[0] for f in fast])), (xs[t],)), ys[t])
            grads = list(torch.autograd.grad(loss, fast, create_graph=True))
            lrs = lr_table[step] if lr_table is not None else torch.full((len(fast),), LR, dtype=F64)
            if optimizer == "momentum":
                fast, buf = reference.momentum_step(fast, grads, state[0], lrs, None, rates, 0.8)
                state = [buf]
            else:
                fast, m, v = reference.adam_step(fast, grads, state[0], state[1], lrs, None, rates, 0.5, 0.9, EPS,
                                                 step + 1)
                state = [m, v]
        losses.append(F.cross_entropy(functional_call(model, dict(zip(names, [f[0] for f in fast])), (xq[t],)), yq[t]))
    return torch.stack(losses).mean()


def config_for(optimizer, **changes):
    return mk.MAMLConfig(**{"algo": "maml", "inner_steps": STEPS, "inner_lr": LR, "inner_clip": None,
                            "inner_optimizer": optimizer, **OPTIMIZERS[optimizer][0], **changes})


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["lslr", "meta_sgd"])
def test_learned_rates_scale_the_optimizers_step(optimizer, kind):
    """LSLR: a rate per step and tensor; Meta-SGD: a rate per element. Both multiply the
    optimizer's step, and get their own meta-gradient."""
    model = mlp()
    batch = tasks("mlp")
    names = [k for k, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(2)
    if kind == "lslr":
        rates = (torch.rand(STEPS, len(names), generator=g, dtype=F64) * 0.1).requires_grad_()
        lrs, leaves, expected = rates, [rates], manual_meta_gradient(model, batch, optimizer, lr_table=rates)
    else:
        per = [(torch.rand(p.shape, generator=g, dtype=F64) * 0.1).requires_grad_() for p in model.parameters()]
        lrs, leaves = dict(zip(names, per)), per
        expected = manual_meta_gradient(model, batch, optimizer, lr_table=torch.ones(STEPS, len(names), dtype=F64),
                                        rates=per)
    want = torch.autograd.grad(expected, list(model.parameters()) + leaves)
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    meta_backward(params, batch, config=config_for(optimizer), model=model, lrs=lrs)
    for a, b in zip([p.grad for p in params.values()] + [t.grad for t in leaves], want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_the_no_graph_paths_take_the_same_steps(optimizer):
    """Evaluation (in place, no graph) adapts to the weights the differentiable path reaches."""
    model = cnn()
    xs, ys, _, _ = tasks("cnn")
    params = dict(model.named_parameters())
    kwargs = dict(model=model, steps=STEPS, lrs=LR, first_order=False, inner_optimizer=mk.InnerOptimizer(
        optimizer, momentum=0.8, betas=(0.5, 0.9), eps=EPS))
    with_graph, _ = mk.adapt(params, (xs, ys), **kwargs)
    with torch.no_grad():
        no_graph, logs = mk.adapt(params, (xs, ys), **kwargs)
    for k in params:
        torch.testing.assert_close(no_graph[k], with_graph[k].detach(), rtol=1e-12, atol=1e-12)
    assert all(math.isfinite(log.update_norm) and log.update_norm > 0 for log in logs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_logged_update_norm_is_the_step_taken(dtype):
    """SGD with a rate per weight: each task's update norm, sqrt(sum_i (lr_i ||g_i||)^2) from the
    batched gradients (strided for Linear weights), is the norm of the weights' change; the log
    holds its mean over the tasks."""
    model = mlp().to(dtype)
    xs, ys, _, _ = tasks("mlp")
    params = dict(model.named_parameters())
    rates = [0.05 * (i + 1) for i in range(len(params))]  # one per parameter, in order
    adapted, logs = mk.adapt(params, (xs.to(dtype), ys), model=model, steps=1, lrs=rates, first_order=True)
    change = torch.stack([(adapted[k] - p).detach().flatten(1).double().pow(2).sum(1) for k, p in params.items()])
    want = float(change.sum(0).sqrt().mean())
    assert logs[0].update_norm == pytest.approx(want, rel=1e-6)  # the log's rates are float32


def test_a_dead_relu_leaves_the_adam_meta_gradient_finite():
    """A hidden unit that no input activates: its weights' inner gradient is exactly 0 at every
    step, so Adam's second moment is 0 there (d sqrt(v) at v = 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].bias[0] = -1e3  # unit 0 is dead for every input
    batch = tasks("mlp")
    for backend in ("reference", "cpp"):
        grads = our_meta_gradient(model, batch, config_for("adam", backend=backend, inner_eps=1e-8))
        assert all(torch.isfinite(g).all() for g in grads), backend


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "imaml"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_metalearner_trains_with_an_inner_optimizer(algo, optimizer):
    model = mk.Conv4(in_channels=1, n_way=3, filters=4, image_size=16)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, 1, 16, 16, generator=g)
    y = torch.arange(3).repeat_interleave(2).repeat(2, 1)
    config = mk.MAMLConfig(algo=algo, inner_steps=2, inner_lr=0.01, inner_optimizer=optimizer)
    learner = mk.MetaLearner(model, config)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = learner.step((x, y, x, y))
    assert math.isfinite(metrics["support_loss" if algo == "reptile" else "query_loss"])  # Reptile has no query pass
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    scores = learner.evaluate([(x, y, x, y)])
    assert 0 <= scores["accuracy"] <= 1


def test_inner_optimizer_settings_are_checked():
    for bad, pattern in ((dict(inner_optimizer="rmsprop"), "unknown inner optimizer 'rmsprop'"),
                         (dict(inner_momentum=1.0), r"inner_momentum: must be in \[0, 1\)"),
                         (dict(inner_betas=[0.9]), "inner_betas: must be a pair of finite numbers"),
                         (dict(inner_betas=(0.9, 1.0)), r"inner_betas: must be two numbers in \[0, 1\)"),
                         (dict(inner_eps=0.0), "inner_eps: must be > 0"),
                         (dict(inner_optimizer="adam", recompute_inner=True), "recompute_inner: rebuilds each step")):
        with pytest.raises(ValueError, match=pattern):
            mk.MAMLConfig(**bad)
    config = mk.config.MetaLearningFullConfig().with_overrides(["maml.inner_optimizer=adam", "maml.inner_betas=[0, 0.99]"])
    assert config.maml.inner_betas == (0.0, 0.99)
    with pytest.raises(ValueError, match="engine='higher' runs plain SGD inside"):
        model = mlp()
        mk.adapt(dict(model.named_parameters()), tasks("mlp")[:2], model=model, steps=1, lrs=0.1, first_order=True,
                 engine="higher", inner_optimizer="adam")


def test_reptile_carries_one_inner_adam_across_outer_steps():
    """inner_state='carried': every task of an outer step starts from the mean of the previous
    step's final Adam moments and its step count, as Nichol et al.'s Reptile keeps one Adam; the
    hand-written loop below runs torch.optim.Adam's formula task by task. Chunks of 2 of 3 tasks
    and a resume from state_dict take the same steps."""
    betas, lr, eps, K = (0.0, 0.9), 0.02, 1e-8, 3
    xs, ys, xq, yq = tasks("mlp")
    config = mk.MAMLConfig(algo="reptile", inner_steps=K, inner_lr=lr, inner_clip=None, inner_optimizer="adam",
                           inner_betas=betas, inner_eps=eps, inner_state="carried", task_chunk=2, reptile_epsilon=0.5)
    model = mlp()
    theta = [p.detach().clone() for p in model.parameters()]
    learner = mk.MetaLearner(model, config)
    learner.step((xs, ys, xq, yq))
    resumed_model = mlp()
    resumed_model.load_state_dict(model.state_dict())
    resumed = mk.MetaLearner(resumed_model, config)
    resumed.load_state_dict(learner.state_dict())
    for each in (learner, resumed):
        each.step((xs, ys, xq, yq))

    reference = mlp()
    m = v = [torch.zeros_like(p) for p in theta]
    t0 = 0
    for _ in range(2):
        adapted, moments = [], []
        for task in range(xs.shape[0]):
            w, tm, tv = [p.clone() for p in theta], [a.clone() for a in m], [a.clone() for a in v]
            x, y = torch.cat([xs[task], xq[task]]), torch.cat([ys[task], yq[task]])  # Reptile trains on both
            for k in range(K):
                p = [a.clone().requires_grad_() for a in w]
                out = functional_call(reference, dict(zip([n for n, _ in reference.named_parameters()], p)), (x,))
                grads = torch.autograd.grad(F.cross_entropy(out, y), p)
                step = t0 + k + 1
                tm = [betas[0] * a + (1 - betas[0]) * g for a, g in zip(tm, grads)]
                tv = [betas[1] * a + (1 - betas[1]) * g * g for a, g in zip(tv, grads)]
                w = [a - lr / (1 - betas[0] ** step) * b / ((c / (1 - betas[1] ** step)).sqrt() + eps)
                     for a, b, c in zip(w, tm, tv)]
            adapted.append(w)
            moments.append((tm, tv))
        theta = [p + 0.5 * (torch.stack(ws).mean(0) - p) for p, ws in zip(theta, zip(*adapted))]
        m = [torch.stack(ms).mean(0) for ms in zip(*[a for a, _ in moments])]
        v = [torch.stack(vs).mean(0) for vs in zip(*[b for _, b in moments])]
        t0 += K
    for each in (model, resumed_model):
        for p, want in zip(each.parameters(), theta):
            torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)
    assert learner.carried_state.steps == resumed.carried_state.steps == 2 * K
    for got, want in zip(learner.carried_state.state[1], v):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # Evaluation adapts from the carried state too, and leaves it as it was.
    scores = learner.evaluate_tasks((xs, ys, xq, yq))
    assert learner.carried_state.steps == 2 * K
    adapted, _ = mk.adapt(dict(model.named_parameters()), (xs, ys), model=model, steps=K, lrs=lr, first_order=True,
                          inner_optimizer=mk.InnerOptimizer("adam", betas=betas, eps=eps))
    fresh = F.cross_entropy(torch.func.vmap(lambda p, x: functional_call(model, p, (x,)))(adapted, xq).flatten(0, 1),
                            yq.flatten(), reduction="none").view(yq.shape).mean(1)
    assert not torch.allclose(scores.query_loss, fresh.detach(), rtol=1e-3)


def test_carried_inner_state_is_for_reptile_with_a_stateful_optimizer():
    for bad in (dict(algo="maml", inner_optimizer="adam"), dict(algo="reptile", inner_optimizer="sgd")):
        with pytest.raises(ValueError, match="inner_state: 'carried' keeps an inner optimizer's state"):
            mk.MAMLConfig(inner_state="carried", **bad)
    with pytest.raises(ValueError, match="inner_state: must be one of per_task, carried"):
        mk.MAMLConfig(inner_state="shared")
