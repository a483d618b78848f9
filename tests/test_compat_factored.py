"""The compat layer's factored Linear steps (meta_kernels.meta.factored.FactoredWeight): a MAML
learner's wide Linear weights held as base - gᵀ x. Meta-gradients through them equal per-task
autograd's in float64, whatever reads the weights; the runner takes the path only by measurement."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta_kernels.compat import _common
from meta_kernels.compat import learn2learn as l2l

LR = 0.3


def wide_mlp():
    # 64 -> 96 -> 64: rank limits 9 (so 5 samples stay factored for one step, and get formed at the second)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 3))


class ReadsWeight(nn.Module):
    """Uses its first Linear's weight outside F.linear too (a penalty-like term in the output)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(64, 96), nn.Linear(96, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x.flatten(1)))
        return self.head(h) + 1e-2 * (self.fc.weight ** 2).sum()


class Tied(nn.Module):
    """One weight in two Linear layers (256 x 256: rank limit 32), and inputs with a sequence dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)
        self.b.weight = self.a.weight
        self.head = nn.Linear(256, 3)

    def forward(self, x):  # x [N, L, 256]
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean(1))


MODELS = {"mlp": (wide_mlp, (6, 1, 8, 8)), "reads_weight": (ReadsWeight, (6, 1, 8, 8)), "tied": (Tied, (6, 2, 256))}


@pytest.fixture
def force_path(monkeypatch):
    """Makes every runner take `path` (on the threads as set) instead of measuring."""
    def force(path):
        def choose(self, key, *args, **kwargs):
            self.choice[key] = (path, None)
            self.unfactored_choice[key] = ("plain", None)
            self.plan = f"{path} (forced by the test)"
            return self.choice[key]
        monkeypatch.setattr(_common.ModelRunner, "_choose", choose)
    return force


def reference_meta_grads(model, xs, ys, xq, yq, steps, first_order, penalty=False):
    """Per-task MAML with torch.func: `steps` inner steps, the query loss's gradient."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    weights = list(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, dict(zip(names, weights)), (xs,)), ys)
        if penalty:
            loss = loss + 1e-3 * sum(w.square().sum() for w in weights)
        grads = torch.autograd.grad(loss, weights, create_graph=not first_order)
        weights = [w - LR * g for w, g in zip(weights, grads)]
    return torch.autograd.grad(F.cross_entropy(functional_call(model, dict(zip(names, weights)), (xq,)), yq), params)


def assert_meta_grads(model, want):
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-10)


def data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(*shape, generator=g, dtype=torch.float64)
    y = lambda: torch.randint(0, 3, (shape[0],), generator=g)
    return x(), y(), x(), y()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_factored_meta_gradients_equal_autograd(force_path, name, steps, first_order):
    force_path("factored")
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    xs, ys, xq, yq = data(shape)
    want = reference_meta_grads(model, xs, ys, xq, yq, steps, first_order)
    learner = l2l.algorithms.MAML(model, lr=LR, first_order=first_order).clone()
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(xs), ys))
    fast = learner._fast
    factored = [e for e in fast.entries if isinstance(e, _common.FactoredWeight)]
    assert factored, "the wide Linear weights are held factored"
    if steps == 1 and name != "reads_weight":  # one step's rank (6 or 2 x 12) is within the limit
        assert any(e.g is not None and e.dense_ is None for e in factored)
    F.cross_entropy(learner(xq), yq).backward()
    assert_meta_grads(model, want)


def test_weights_read_between_steps_are_the_adapted_ones(force_path):
    """parameters() forms a factored weight; a loss term on it (a penalty) reaches the meta-gradient
    and the next step, as with tensors."""
    force_path("factored")
    torch.manual_seed(1)
    model = wide_mlp().double()
    xs, ys, xq, yq = data((6, 1, 8, 8), seed=1)
    want = reference_meta_grads(model, xs, ys, xq, yq, 2, False, penalty=True)
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    for step in range(2):
        out = learner(xs)  # forward first (factored), then the weights are read for the penalty
        loss = F.cross_entropy(out, ys) + 1e-3 * sum(w.square().sum() for w in learner.parameters())
        if step == 0:
            grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
            by_hand = [p - LR * g for p, g in zip(model.parameters(), grads)]
        learner.adapt(loss)
        if step == 0:
            for got, w in zip(learner.parameters(), by_hand):
                torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    F.cross_entropy(learner(xq), yq).backward()
    assert_meta_grads(model, want)


def test_clone_of_an_adapted_learner_and_module_access_keep_the_factors(force_path):
    force_path("factored")
    torch.manual_seed(2)
    model = wide_mlp().double()
    xs, ys, xq, yq = data((6, 1, 8, 8), seed=2)
    want = reference_meta_grads(model, xs, ys, xq, yq, 2, False)
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    again = learner.clone()  # learn2learn: a clone of a clone stays connected to the model
    assert any(isinstance(e, _common.FactoredWeight) and e.g is not None for e in again._fast.entries)
    again.adapt(F.cross_entropy(again(xs), ys))
    torch.testing.assert_close(again.module[1].weight, list(again.parameters())[0], rtol=0, atol=0)
    F.cross_entropy(again(xq), yq).backward()
    assert_meta_grads(model, want)


def test_metasgd_on_a_factored_choice_runs_unfactored(force_path):
    """MetaSGD's per-element rates are not a rank-r update: its learners take the runner's best
    unfactored path."""
    force_path("factored")
    torch.manual_seed(3)
    model = wide_mlp().double()
    xs, ys, xq, yq = data((6, 1, 8, 8), seed=3)
    want = reference_meta_grads(model, xs, ys, xq, yq, 1, False)  # lrs all LR: MAML's meta-gradient
    meta_sgd = l2l.algorithms.MetaSGD(model, lr=LR)
    learner = meta_sgd.clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    assert not any(isinstance(e, _common.FactoredWeight) for e in learner._fast.entries)
    F.cross_entropy(learner(xq), yq).backward()
    assert_meta_grads(model, want)


def test_only_wide_linear_weights_are_factorable():
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 5), nn.Conv1d(3, 64, 3), nn.Linear(16, 16))
    runner = _common.ModelRunner(model)
    assert runner.factorable == [0]  # 96 x 64: rank limit 38; 5 x 96: 4; 16 x 16: 8; the conv is no Linear
    assert _common.factored_rank_limit(256, 784) == 192  # the factors hold no more numbers than the weight


def test_a_weight_past_its_rank_limit_is_formed_and_stays_exact(force_path, monkeypatch):
    force_path("factored")
    torch.manual_seed(7)
    model = wide_mlp().double()
    xs, ys, xq, yq = data((6, 1, 8, 8), seed=7)
    want = reference_meta_grads(model, xs, ys, xq, yq, 3, False)
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    out = learner(xs)  # the runner finds the factorable weights with the real limit
    from meta_kernels.meta import factored
    monkeypatch.setattr(factored, "factored_rank_limit", lambda out_features, in_features: 8)
    ranks = []
    for _ in range(3):
        learner.adapt(F.cross_entropy(out, ys))
        ranks.append(learner._fast.entries[0].rank)
        out = learner(xs)
    assert ranks == [6, 0, 6]  # formed at the second step (12 > 8), factored again from there
    F.cross_entropy(learner(xq), yq).backward()
    assert_meta_grads(model, want)


@pytest.mark.parametrize("steps", [1, 3])
def test_higher_sgd_factored_steps_equal_autograd(force_path, steps):
    """higher's innerloop_ctx with plain SGD (two parameter groups, two rates): fmodel's wide
    Linear weights stepped factored; meta-gradient and fmodel's weights at every time equal
    autograd's per-task steps."""
    from meta_kernels.compat import higher
    force_path("factored")
    torch.manual_seed(8)
    model = wide_mlp().double()
    xs, ys, xq, yq = data((6, 1, 8, 8), seed=8)
    params = list(model.parameters())
    rates = [0.3 if i < 2 else 0.1 for i in range(len(params))]
    names = [n for n, _ in model.named_parameters()]
    weights, history = list(params), [list(params)]
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(functional_call(model, dict(zip(names, weights)), (xs,)), ys),
                                    weights, create_graph=True)
        weights = [w - r * g for w, r, g in zip(weights, rates, grads)]
        history.append(weights)
    want = torch.autograd.grad(F.cross_entropy(functional_call(model, dict(zip(names, weights)), (xq,)), yq), params)
    opt = torch.optim.SGD([{"params": params[:2], "lr": 0.3}, {"params": params[2:], "lr": 0.1}])
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            new = diffopt.step(F.cross_entropy(fmodel(xs), ys))
        assert any(isinstance(e, _common.FactoredWeight) and e.g is not None for e in fmodel._fast.entries)
        assert len(new) == len(params)
        F.cross_entropy(fmodel(xq), yq).backward()
        for time, expected in enumerate(history):
            for got, w in zip(fmodel.parameters(time=time), expected):
                torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)
    assert_meta_grads(model, want)


def test_higher_with_momentum_keeps_tensors(force_path):
    from meta_kernels.compat import higher
    force_path("factored")
    model = wide_mlp().double()
    xs, ys, _, _ = data((6, 1, 8, 8), seed=9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(xs), ys))
        assert not any(isinstance(e, _common.FactoredWeight) for e in fmodel._fast.entries)


@pytest.mark.parametrize("factored_faster", [True, False])
def test_the_factored_path_is_taken_by_measurement(monkeypatch, factored_faster):
    clock = iter(range(100_000))
    real_exercise = _common._exercise

    def exercise(runner, path, *args):
        for _ in range(5 if (path == "factored") != factored_faster else 0):
            next(clock)
        return real_exercise(runner, path, *args)

    monkeypatch.setattr(_common.time, "perf_counter", lambda: next(clock) * 1e-3)
    monkeypatch.setattr(_common, "_exercise", exercise)
    model = wide_mlp().double()
    xs, ys, _, _ = data((6, 1, 8, 8))
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    plan = _common.runner_for(model).plan
    assert plan.startswith("factored for MAML learners, plain" if factored_faster else "plain")
    assert "factored Linear steps" in plan
    assert any(isinstance(e, _common.FactoredWeight) for e in learner._fast.entries) == factored_faster


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_learner_factored_meta_gradients_equal_the_per_task_sum(steps, first_order):
    """MAML(..., tasks=T): the engine's Linear layers take the factored weights per task ([T, r, *]
    factors on one shared base); the meta-gradient of the summed query loss is the sum of each
    task's autograd one."""
    from meta_kernels.compat import task_sum
    T = 3
    torch.manual_seed(4)
    model = wide_mlp().double()
    tasks = [data((6, 1, 8, 8), seed=10 + t) for t in range(T)]
    want = [sum(ws) for ws in zip(*(reference_meta_grads(model, *task, steps, first_order) for task in tasks))]
    xs, ys, xq, yq = (torch.stack([task[k] for task in tasks]) for k in range(4))
    learner = l2l.algorithms.MAML(model, lr=LR, first_order=first_order).clone(tasks=T)
    assert sum(isinstance(w, _common.FactoredWeight) for w in learner._weights) == 2  # 64 -> 96, 96 -> 64
    loss = task_sum(F.cross_entropy)
    for _ in range(steps):
        learner.adapt(loss(learner(xs), ys))
    if steps == 1:
        assert all(w.g is not None and w.g.shape[:2] == (T, 6) for w in learner._weights
                   if isinstance(w, _common.FactoredWeight))
    loss(learner(xq), yq).backward()
    assert_meta_grads(model, want)
    formed = list(learner.parameters())  # the T adapted weights, formed on request
    assert formed[0].shape == (T, 96, 64)


def test_float32_factored_error_no_worse_than_the_dense_steps(force_path):
    """In float32 the factored products round differently from the dense ones: their meta-gradient's
    error against float64 stays within twice the dense (own layers) path's error."""
    torch.manual_seed(5)
    model64 = wide_mlp().double()
    xs, ys, xq, yq = data((6, 1, 8, 8), seed=5)
    want = reference_meta_grads(model64, xs, ys, xq, yq, 1, False)
    errors = {}
    for path in ("plain", "factored"):
        force_path(path)
        model = wide_mlp()
        model.load_state_dict(model64.state_dict())
        learner = l2l.algorithms.MAML(model, lr=LR).clone()
        learner.adapt(F.cross_entropy(learner(xs.float()), ys))
        F.cross_entropy(learner(xq.float()), yq).backward()
        errors[path] = max(float((p.grad.double() - w).abs().max() / w.abs().max()) for p, w in zip(model.parameters(), want))
    assert errors["factored"] <= 2 * errors["plain"] + 1e-7, errors


def test_eval_forward_without_grad_and_module_access_after_factored_steps(force_path):
    force_path("factored")
    torch.manual_seed(6)
    model = wide_mlp().double()
    xs, ys, xq, _ = data((6, 1, 8, 8), seed=6)
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    with torch.no_grad():
        out = learner(xq)  # factored, nothing recorded
    assert not learner._fast.records
    weights = [w.detach() for w in learner.parameters()]  # formed from here on: the adapted values
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(out, functional_call(model, dict(zip(names, weights)), (xq,)), rtol=1e-12, atol=1e-12)
    learner.eval()  # reaches into the modules: the tree copy holds the formed weights
    torch.testing.assert_close(learner(xq), out, rtol=1e-12, atol=1e-12)


def test_a_weight_formed_under_no_grad_keeps_its_graph_for_later_steps(force_path):
    """An evaluation under torch.no_grad() between steps forms a weight that the model reads
    itself: that form has no graph and is not kept, so the next step's meta-gradient stays exact."""
    force_path("factored")
    torch.manual_seed(0)
    model = ReadsWeight().double()
    xs, ys, xq, yq = data((6, 1, 8, 8))
    want = reference_meta_grads(model, xs, ys, xq, yq, 2, False)
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    learner.adapt(F.cross_entropy(learner(xs), ys))
    with torch.no_grad():
        learner(xq)  # reads fc.weight: formed here without a graph
    learner.adapt(F.cross_entropy(learner(xs), ys))
    F.cross_entropy(learner(xq), yq).backward()
    assert_meta_grads(model, want)
