"""meta_kernels.compat.learn2learn: learn2learn 0.2's documented MAML / MetaSGD contract, and the
batched form `clone(tasks=T)` against our meta_loss and a per-task loop."""
import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta_kernels.compat import learn2learn as l2l
from meta_kernels.compat import task_sum
from meta_kernels.config import MAMLConfig
from meta_kernels.meta import meta_loss

WAYS = 3


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, WAYS))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, WAYS))


def tasks(T=3, n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(T, n, 1, 8, 8, generator=g, dtype=dtype)
    y = lambda: torch.randint(0, WAYS, (T, n), generator=g)
    return x(), y(), x(), y()


def grads_of(model):
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def assert_all_close(a, b, tol=1e-10):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


def test_clone_outputs_equal_the_module_and_buffers_are_shared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    maml = l2l.algorithms.MAML(model, lr=0.1)
    learner = maml.clone()
    before = model[1].running_mean.clone()
    torch.testing.assert_close(learner(x), model(x), rtol=1e-12, atol=1e-12)
    # A clone starts from the model's own weights (learn2learn copies them: the same gradients).
    assert all(a is b for a, b in zip(learner.parameters(), model.parameters()))
    # As in learn2learn, buffers are the original's: a clone's training forward moves its statistics.
    assert learner.module[1].running_mean is model[1].running_mean
    assert not torch.equal(model[1].running_mean, before)
    assert learner.module is not model and learner.module[0] is not model[0]


def test_first_order_adapt_equals_the_hand_computed_update():
    torch.manual_seed(1)
    model = cnn().double()
    xs, ys, _, _ = tasks(T=1)
    grads = torch.autograd.grad(F.cross_entropy(model(xs[0]), ys[0]), list(model.parameters()))
    learner = l2l.algorithms.MAML(model, lr=0.3, first_order=True).clone()
    learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
    for new, p, g in zip(learner.parameters(), model.parameters(), grads):
        torch.testing.assert_close(new, p - 0.3 * g, rtol=1e-12, atol=1e-12)
    # The update stays connected to the original weights (first order: d new / d p = identity).
    new = list(learner.parameters())
    sum(t.sum() for t in new).backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_second_order_graph_reaches_the_original_weights():
    torch.manual_seed(2)
    model = mlp().double()
    xs, ys, xq, yq = tasks(T=1)
    meta = {}
    for first_order in (False, True):
        learner = l2l.algorithms.MAML(model, lr=0.5, first_order=first_order).clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
        F.cross_entropy(learner(xq[0]), yq[0]).backward()
        meta[first_order] = grads_of(model)
    # by hand: the same two steps with torch.autograd, second order
    w = dict(model.named_parameters())
    fast = dict(w)
    for _ in range(2):
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, fast, xs[0]), ys[0]), list(fast.values()),
                                create_graph=True)
        fast = {k: v - 0.5 * gi for (k, v), gi in zip(fast.items(), g)}
    expected = torch.autograd.grad(F.cross_entropy(functional_call(model, fast, xq[0]), yq[0]), list(w.values()))
    assert_all_close(meta[False], list(expected))
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(meta[False], meta[True]))


class HalfUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def test_allow_nograd_and_allow_unused():
    torch.manual_seed(3)
    model = mlp().double()
    model[1].weight.requires_grad_(False)  # a frozen layer
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, WAYS, (5,))
    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    with pytest.raises(ValueError, match=r"1\.weight.*allow_nograd=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    learner = l2l.algorithms.MAML(model, lr=0.1, allow_nograd=True).clone()
    learner.adapt(F.cross_entropy(learner(x), y))
    assert torch.equal(learner.module[1].weight, model[1].weight)
    assert not torch.equal(learner.module[3].weight, model[3].weight)

    model = HalfUsed().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    with pytest.raises(ValueError, match=r"unused\.weight.*allow_unused=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    learner.adapt(F.cross_entropy(learner(x), y), allow_unused=True)
    assert torch.equal(learner.module.unused.weight, model.unused.weight)
    assert not torch.equal(learner.module.used.weight, model.used.weight)


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight, and one module under two names."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4, bias=False)
        self.dec = nn.Linear(6, 4, bias=False)
        self.dec.weight = self.enc.weight
        self.out = nn.Linear(6, 2)
        self.head = self.out

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x)) @ self.dec.weight)


def test_shared_parameters_stay_shared_and_adapt_once():
    torch.manual_seed(4)
    model = Tied().double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 2, (5,))
    learner = l2l.algorithms.MAML(model, lr=0.2).clone()
    assert learner.module.dec.weight is learner.module.enc.weight and learner.module.head is learner.module.out
    grads = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))))
    learner.adapt(F.cross_entropy(learner(x), y))
    assert learner.module.dec.weight is learner.module.enc.weight
    torch.testing.assert_close(learner.module.enc.weight, model.enc.weight - 0.2 * grads["enc.weight"])
    torch.testing.assert_close(learner.module.head.bias, model.out.bias - 0.2 * grads["out.bias"])


def test_memory_stays_flat_across_clone_adapt_cycles():
    torch.manual_seed(5)
    model = cnn()
    maml = l2l.algorithms.MAML(model, lr=0.1)
    xs, ys, xq, yq = tasks(T=1, dtype=torch.float32)
    refs, live = [], []
    for cycle in range(12):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
        F.cross_entropy(learner(xq[0]), yq[0]).backward()
        refs.append(weakref.ref(next(learner.parameters())))
        del learner
        gc.collect()
        live.append(sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects()))
    assert all(r() is None for r in refs)  # every learner's weights were freed
    assert live[-1] <= live[2]


def test_meta_sgd_rates_get_gradients_and_update_per_element():
    torch.manual_seed(6)
    model = mlp().double()
    xs, ys, xq, yq = tasks(T=1)
    meta_sgd = l2l.algorithms.MetaSGD(model, lr=0.1)
    with torch.no_grad():
        for rate in meta_sgd.lrs:
            rate.uniform_(0.05, 0.2)
    assert len(list(meta_sgd.parameters())) == 2 * len(list(model.parameters()))
    learner = meta_sgd.clone()
    support = F.cross_entropy(learner(xs[0]), ys[0])
    grads = torch.autograd.grad(support, list(learner.parameters()), retain_graph=True)
    learner.adapt(support)
    for new, p, rate, g in zip(learner.parameters(), model.parameters(), meta_sgd.lrs, grads):
        torch.testing.assert_close(new, p - rate * g, rtol=1e-12, atol=1e-12)
    F.cross_entropy(learner(xq[0]), yq[0]).backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in meta_sgd.lrs)
    assert all(p.grad is not None for p in model.parameters())


def test_clone_of_a_clone_keeps_the_graph():
    torch.manual_seed(7)
    model = mlp().double()
    xs, ys, xq, yq = tasks(T=1)
    learner = l2l.algorithms.MAML(model, lr=0.2).clone()
    learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
    inner = learner.clone()
    inner.adapt(F.cross_entropy(inner(xs[0]), ys[0]))
    F.cross_entropy(inner(xq[0]), yq[0]).backward()
    twice = grads_of(model)
    learner = l2l.algorithms.MAML(model, lr=0.2).clone()
    for _ in range(2):
        learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
    F.cross_entropy(learner(xq[0]), yq[0]).backward()
    assert_all_close(twice, grads_of(model))


# ---- the batched form: float64 meta-gradients against meta_loss and a per-task loop ------------

@pytest.mark.parametrize("make_model", [cnn, mlp], ids=["cnn_bn", "mlp"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_batched_and_per_task_meta_gradients_equal_meta_loss(make_model, first_order):
    torch.manual_seed(8)
    model, T, steps, lr = make_model().double(), 3, 2, 0.4
    xs, ys, xq, yq = tasks(T=T)
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)

    for t in range(T):  # learn2learn's loop, one clone per task
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
        (F.cross_entropy(learner(xq[t]), yq[t]) / T).backward()
    loop = grads_of(model)

    learner = maml.clone(tasks=T)  # the batched form
    loss_fn = task_sum(F.cross_entropy)
    for _ in range(steps):
        learner.adapt(loss_fn(learner(xs), ys))
    (loss_fn(learner(xq), yq) / T).backward()
    batched = grads_of(model)

    cfg = MAMLConfig(algo="fomaml" if first_order else "maml", inner_steps=steps, inner_lr=lr, inner_clip=None,
                     engine="custom")
    out = meta_loss(dict(model.named_parameters()), (xs, ys, xq, yq), config=cfg, model=model, track_curve=False)
    reference = list(torch.autograd.grad(out.loss, list(model.parameters())))
    assert_all_close(loop, reference)
    assert_all_close(batched, reference)


def test_batched_meta_sgd_equals_the_per_task_loop():
    torch.manual_seed(9)
    model, T = cnn().double(), 2
    xs, ys, xq, yq = tasks(T=T)
    meta_sgd = l2l.algorithms.MetaSGD(model, lr=0.3)
    results = []
    for batched in (False, True):
        if batched:
            learner = meta_sgd.clone(tasks=T)
            learner.adapt(task_sum(F.cross_entropy)(learner(xs), ys))
            task_sum(F.cross_entropy)(learner(xq), yq).backward()
        else:
            for t in range(T):
                learner = meta_sgd.clone()
                learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
                F.cross_entropy(learner(xq[t]), yq[t]).backward()
        results.append(grads_of(meta_sgd))
    assert_all_close(*results)


def test_batched_learner_with_a_frozen_backbone_and_bad_inputs():
    torch.manual_seed(10)
    model, T = cnn().double(), 2
    for p in list(model.parameters())[:-2]:
        p.requires_grad_(False)
    xs, ys, xq, yq = tasks(T=T)
    maml = l2l.algorithms.MAML(model, lr=0.3)
    with pytest.raises(ValueError, match="allow_nograd=True"):
        maml.clone(tasks=T).adapt(task_sum(F.cross_entropy)(maml.clone(tasks=T)(xs), ys))
    learner = maml.clone(tasks=T, allow_nograd=True)
    learner.adapt(task_sum(F.cross_entropy)(learner(xs), ys))
    weights = dict(learner.named_parameters())
    assert weights["9.weight"].shape == (T, WAYS, 16)
    assert torch.equal(weights["0.weight"][1], model[0].weight)
    task_sum(F.cross_entropy)(learner(xq), yq).backward()
    assert model[9].weight.grad is not None and model[0].weight.grad is None
    with pytest.raises(ValueError, match=r"adapts 2 tasks at once.*\[2, N, \.\.\.\]"):
        learner(xs[:1])
    with pytest.raises(ValueError, match="task_sum"):
        learner.adapt(learner(xs).logsumexp(-1))  # [T, N]: per-sample losses
    with pytest.raises(ValueError, match="positive int"):
        maml.clone(tasks=0)


# ---- the same script through the original learn2learn 0.2 ---------------------------------------

@pytest.fixture(scope="module")
def original_l2l():
    from meta_kernels.compat import original_learn2learn
    try:
        return original_learn2learn.load()
    except original_learn2learn.Unavailable as e:
        pytest.skip(str(e))


def l2l_script(lib, model, xs, ys, xq, yq, meta_sgd=False):
    """A learn2learn user's meta-training step, written once for either library."""
    wrapper = lib.algorithms.MetaSGD(model, lr=0.3) if meta_sgd else lib.algorithms.MAML(model, lr=0.3)
    for t in range(xs.shape[0]):
        learner = wrapper.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
        F.cross_entropy(learner(xq[t]), yq[t]).backward()
    return [p.grad.clone() for p in wrapper.parameters()]


@pytest.mark.parametrize("make_model", [cnn, mlp], ids=["cnn_bn", "mlp"])
@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "meta_sgd"])
def test_the_same_script_through_the_original_learn2learn(original_l2l, make_model, meta_sgd):
    batch = tasks(T=2)
    results = []
    for lib in (original_l2l, l2l):
        torch.manual_seed(11)
        results.append(l2l_script(lib, make_model().double(), *batch, meta_sgd=meta_sgd))
    assert_all_close(*results)


class ReadsConvWeight(nn.Module):
    """A forward that reads a conv's weight itself: the task-aware view cannot run it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2 * 36, WAYS)

    def forward(self, x):
        return self.fc(F.relu(self.bn(F.conv2d(x, self.conv.weight, self.conv.bias))).flatten(1))


@pytest.mark.parametrize("engine_faster", [True, False])
def test_the_forward_path_is_chosen_by_measurement_once_per_model(monkeypatch, engine_faster):
    """A model with fused-op layers times its own layers against the fused ops on its first
    differentiated call and keeps the faster; the timing leaves the running statistics alone."""
    from meta_kernels import ops
    from meta_kernels.compat import _common
    clock = iter(range(10_000))  # a timed call takes 1 tick, the slower path 5 more
    real_run = _common.ModelRunner.run

    def run(self, path, *a, **k):
        if path == ("plain" if engine_faster else "engine"):
            for _ in range(5):
                next(clock)
        return real_run(self, path, *a, **k)

    monkeypatch.setattr(_common.time, "perf_counter", lambda: next(clock) * 1e-3)
    monkeypatch.setattr(_common.ModelRunner, "run", run)
    calls = []
    monkeypatch.setattr(ops, "batch_norm", lambda *a, real=ops.batch_norm, **k: calls.append(1) or real(*a, **k))
    model = cnn().double()
    model[1] = nn.BatchNorm2d(4).double()  # running statistics, which the timing must not move
    reference = copy.deepcopy(model)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    torch.testing.assert_close(learner(x), reference(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=1e-12, atol=1e-12)
    assert model[1].num_batches_tracked == reference[1].num_batches_tracked == 1
    runner = _common.runner_for(model)
    assert runner.plan.startswith("engine" if engine_faster else "plain") and "measured" in runner.plan
    calls.clear()
    learner.adapt(F.cross_entropy(learner(x), torch.zeros(6, dtype=torch.long)))
    assert bool(calls) == engine_faster
    before = next(clock)
    l2l.algorithms.MAML(model, lr=0.1).clone()(x)  # another learner of the model: no new timing
    assert next(clock) == before + 1


class _ThreadProbe(torch.autograd.Function):
    """Identity that records torch's thread count in its forward and backward."""
    seen: list = []

    @staticmethod
    def forward(ctx, x):
        _ThreadProbe.seen.append(("forward", torch.get_num_threads()))
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _ThreadProbe.seen.append(("backward", torch.get_num_threads()))
        return _ThreadProbe.apply(g)  # differentiable: the meta-gradient's backward passes here too


class ProbedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(_ThreadProbe.apply(torch.tanh(self.fc1(x))))


@pytest.mark.parametrize("library,faster", [("learn2learn", "one"), ("higher", "one"), ("learn2learn", "all")])
def test_one_thread_chosen_by_measurement_holds_for_forward_and_inner_gradient_only(monkeypatch, library, faster):
    """Where the one-thread candidates measure faster, the forward and the inner
    gradient run on one thread; the count is restored after each call (also when it raises), the
    meta-loss's backward runs on the threads as set, and the meta-gradient is the per-task
    autograd's. Where all threads are faster, everything runs on them."""
    from meta_kernels.compat import _common, higher, runner_plan
    clock = iter(range(10_000))
    real_exercise = _common._exercise
    slower = {"one": None, "all": 1}[faster]  # the candidates 5 ticks slower

    def exercise(runner, path, weights, buffers, args, kwargs, second_order, threads):
        for _ in range(5 if threads == slower else 0):
            next(clock)
        return real_exercise(runner, path, weights, buffers, args, kwargs, second_order, threads)

    monkeypatch.setattr(_common.time, "perf_counter", lambda: next(clock) * 1e-3)
    monkeypatch.setattr(_common, "_exercise", exercise)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(3)
        model = ProbedMLP().double()
        x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
        names = [n for n, _ in model.named_parameters()]
        params = list(model.parameters())
        inner = torch.autograd.grad(F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y), params,
                                    create_graph=True)
        adapted = dict(zip(names, [p - 0.3 * g for p, g in zip(params, inner)]))
        want = torch.autograd.grad(F.cross_entropy(functional_call(model, adapted, (x * 2,)), y), params)
        _ThreadProbe.seen.clear()
        if library == "learn2learn":
            learner = l2l.algorithms.MAML(model, lr=0.3).clone()
            out = learner(x)
            assert runner_plan(model).startswith("plain (no layer" if faster == "all" else
                                                  "plain on one thread (no layer with a fused op")
            _ThreadProbe.seen.clear()
            learner.adapt(F.cross_entropy(out, y))
            meta_loss = F.cross_entropy(learner(x * 2), y)
        else:
            fmodel = higher.patch.monkeypatch(model, copy_initial_weights=False)
            diffopt = higher.optim.DifferentiableSGD(torch.optim.SGD(model.parameters(), lr=0.3), model.parameters(),
                                                     fmodel=fmodel)
            out = fmodel(x)
            assert runner_plan(model).startswith("plain on one thread")
            _ThreadProbe.seen.clear()
            diffopt.step(F.cross_entropy(out, y))
            meta_loss = F.cross_entropy(fmodel(x * 2), y)
        n = 2 if faster == "all" else 1
        assert _ThreadProbe.seen == [("backward", n), ("forward", n), ("forward", n)]  # inner grad, forward
        assert torch.get_num_threads() == 2
        _ThreadProbe.seen.clear()
        meta_loss.backward()
        assert _ThreadProbe.seen and all(n == 2 for _, n in _ThreadProbe.seen)
        assert_all_close([p.grad for p in model.parameters()], want)
        with pytest.raises(RuntimeError):
            (learner if library == "learn2learn" else fmodel)(torch.randn(5, 7, dtype=torch.float64))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_one_thread_is_not_tried_when_turned_off(monkeypatch):
    from meta_kernels.compat import runner_plan
    monkeypatch.setenv("META_KERNELS_COMPAT_ONE_THREAD", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = ProbedMLP().double()
        x = torch.randn(5, 6, dtype=torch.float64)
        l2l.algorithms.MAML(model, lr=0.3).clone()(x)
        assert runner_plan(model) == "plain (no layer with a fused op, no other thread count to try)"
    finally:
        torch.set_num_threads(threads)


def test_models_the_fused_view_cannot_run_keep_their_own_layers():
    model = ReadsConvWeight().double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    torch.testing.assert_close(learner(x), model(x), rtol=1e-12, atol=1e-12)
    from meta_kernels.compat import _common
    assert _common.runner_for(model).plan.startswith(("plain (a path cannot run this model",
                                                      "plain on one thread (a path cannot run this model"))
    learner.adapt(F.cross_entropy(learner(x), torch.zeros(6, dtype=torch.long)))  # and adapts as it is
    mlp_model = mlp().double()
    l2l.algorithms.MAML(mlp_model, lr=0.1).clone()(x)
    assert _common.runner_for(mlp_model).plan.startswith(("plain (no layer with a fused op",
                                                          "plain on one thread (no layer with a fused op"))


class TinyAttention(nn.Module):
    """Two-head self-attention through F.scaled_dot_product_attention (torch's fused CPU kernel:
    no double backward), mean over the sequence, a linear head."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 24), nn.Linear(8, WAYS)

    def forward(self, x):  # x [N, length, 4]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # each [N, heads, length, 4]
        return self.head(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).mean(1))


@pytest.mark.parametrize("lib", ["ours", "original"])
def test_a_model_without_second_order_fails_where_the_original_fails(lib, request):
    """A model whose second-order MAML step cannot be taken (attention on torch's fused CPU kernel)
    fails in the user's loop where the original learn2learn fails -- the meta-loss's backward --
    not in the runner's measurement at the first forward; ours says so beforehand, with the fix."""
    library = l2l if lib == "ours" else request.getfixturevalue("original_l2l")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two thread counts: the runner measures
    try:
        torch.manual_seed(0)
        model = TinyAttention()
        x, y = torch.randn(6, 5, 4), torch.arange(6) % WAYS
        learner = library.algorithms.MAML(model, lr=0.1).clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learner.adapt(F.cross_entropy(learner(x), y))
            query_loss = F.cross_entropy(learner(x), y)
        with pytest.raises(RuntimeError, match="scaled_dot_product"):
            query_loss.backward()
        said = [str(w.message) for w in caught if "meta_kernels.compat" in str(w.message)]
        if lib == "original":
            assert not said
            return
        from meta_kernels.compat import runner_plan
        assert runner_plan(model).startswith("plain (not measured: a second-order MAML step through this model "
                                             "raised RuntimeError")
        assert len(said) == 1 and "TinyAttention raised RuntimeError" in said[0], said
        assert "sdpa_kernel(SDPBackend.MATH)" in said[0] and "first_order=True" in said[0]
        # Either fix runs: first order (no double backward; measured), or the math backend.
        first_order = l2l.algorithms.MAML(model, lr=0.1, first_order=True).clone()
        first_order.adapt(F.cross_entropy(first_order(x), y))
        F.cross_entropy(first_order(x), y).backward()
        assert "first-order step measured" in runner_plan(model)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            other = TinyAttention()
            learner = l2l.algorithms.MAML(other, lr=0.1).clone()
            learner.adapt(F.cross_entropy(learner(x), y))
            F.cross_entropy(learner(x), y).backward()
        assert "second-order step measured" in runner_plan(other)
    finally:
        torch.set_num_threads(threads)


# ---- l2l.utils and l2l.nn, as ported scripts call them ---------------------------------------------

def test_utils_clone_update_detach_equal_the_original(original_l2l):
    """A hand-written MAML step with l2l.utils: clone_module, update_module(updates=...), the meta-
    gradient through it, and detach_module -- equal to the original learn2learn's utils."""
    xs, ys, xq, yq = tasks(T=1)
    results = []
    for lib in (original_l2l, l2l):
        torch.manual_seed(12)
        model = Tied().double()
        x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 2, (5,))
        clone = lib.utils.clone_module(model)
        grads = torch.autograd.grad(F.cross_entropy(clone(x), y), list(clone.parameters()), create_graph=True)
        lib.utils.update_module(clone, updates=[-0.3 * g for g in grads])
        assert clone.dec.weight is clone.enc.weight  # tied weights stay tied through the update
        F.cross_entropy(clone(x * 2), y).backward()
        results.append([p.grad.clone() for p in model.parameters()])
        lib.utils.detach_module(clone)
        assert all(not p.requires_grad for p in clone.parameters())
        assert len(lib.utils.clone_parameters(model.parameters())) == len(list(model.parameters()))
    assert_all_close(*results)
    with pytest.raises(ValueError, match="1 updates for 3 parameters"):
        l2l.utils.update_module(Tied(), updates=[torch.zeros(1)])


def test_nn_lambda_flatten_scale():
    x = torch.randn(3, 2, 4)
    assert l2l.nn.Lambda(lambda t: t.mean(dim=[1, 2]))(x).shape == (3,)
    assert l2l.nn.Flatten()(x).shape == (3, 8)
    scale = l2l.nn.Scale((2, 4), alpha=0.5)
    torch.testing.assert_close(scale(x), x * 0.5)
    assert [n for n, _ in scale.named_parameters()] == ["alpha"] and scale.alpha.shape == (2, 4)
    assert l2l.nn.Scale().alpha.shape == (1,) and l2l.nn.Scale(3).alpha.shape == (3,)
    with pytest.raises(TypeError, match="Lambda takes a callable"):
        l2l.nn.Lambda(3)


def test_learner_modules_reached_into_stay_in_step_with_updates():
    """`learner.module` and the model's attributes through the learner are a copy of the tree holding
    the learner's weights, updated in place by every adapt (as learn2learn's clone is)."""
    torch.manual_seed(13)
    model = mlp().double()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, WAYS, (5,))
    learner = l2l.algorithms.MAML(model, lr=0.2).clone()
    module = learner.module
    assert module is not model and module[1].weight is model[1].weight
    learner.adapt(F.cross_entropy(learner(x), y))
    assert module[1].weight is list(learner.parameters())[0] and learner.module is module
    torch.testing.assert_close(learner(x), module(x), rtol=0, atol=0)
    learner.eval()  # a clone's mode is its own, as in learn2learn
    assert not module.training and model.training
