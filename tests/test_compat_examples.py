"""The peers' own example loops on their own example models (tests/peer_examples): the import-swapped
loop and the README's batched form give the original library's meta-gradients (float64), the
README's diff applies with `patch` and changes at most 3 lines of each example, and running
statistics after a batched step are what the per-task loop leaves."""
import copy

import pytest
import torch
from torch import nn

import peer_examples as pe
from meta_kernels.compat import higher as compat_higher
from meta_kernels.compat import learn2learn as compat_l2l
from meta_kernels.models import peers

MODELS = {"omniglot_fc": peers.OmniglotFC, "omniglot_cnn": peers.OmniglotCNN, "higher_net": peers.higher_omniglot_net,
          "mlp": peers.mlp}
F64 = torch.float64


@pytest.fixture(scope="module")
def original_l2l():
    from meta_kernels.compat import original_learn2learn
    try:
        return original_learn2learn.load()
    except original_learn2learn.Unavailable as e:
        pytest.skip(str(e))


def run_l2l(make, source=None, T=3, **names):
    torch.manual_seed(0)
    model = make().double()
    log = pe.load("l2l", source=source, **names).main(model, pe.random_tasksets(dtype=F64), meta_batch_size=T)
    return [p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()], log


def run_higher(make, source=None, T=3, **names):
    torch.manual_seed(0)
    net = make().double()
    log = []
    pe.load("higher", source=source, **names).train(pe.RandomNShot(batchsz=T, k_shot=1, k_query=3, dtype=F64), net,
                                                    "cpu", torch.optim.Adam(net.parameters(), 1e-3), 0, log)
    return [p.grad.clone() for p in net.parameters()], [b.clone() for b in net.buffers()], log


def assert_close_lists(a, b, tol=1e-10):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("model", MODELS)
def test_learn2learn_example_swapped_and_batched_equal_the_original(original_l2l, model):
    make = MODELS[model]
    grads, buffers, log = run_l2l(make, l2l=original_l2l)
    for source in (None, pe.patched_source("l2l")):  # the import swapped, then the README's batched form
        g, b, lg = run_l2l(make, source)
        assert_close_lists(g, grads)
        for key, value in log[0].items():  # the example's own printed metrics, summed as its loop sums them
            assert lg[0][key] == pytest.approx(value, rel=1e-6), key
        if source is None or model != "omniglot_cnn":
            # Running statistics: the swapped loop's are the original's; the batched form's too
            # with momentum 1 (higher_net). OmniglotCNN (momentum 0.1, four forwards per task in
            # the loop's order) is covered by test_running_statistics_of_a_batched_forward.
            assert_close_lists(b, buffers)


@pytest.mark.parametrize("model", ["omniglot_fc", "mlp"])
def test_learn2learn_example_with_factored_linear_steps_equals_the_original(original_l2l, monkeypatch, model):
    """The swapped loop with the runner's factored path taken whatever it measures (the wide
    Linear weights of OmniglotFC and the MLP held as base - gᵀ x)."""
    from meta_kernels.compat import _common

    def choose(self, key, *args, **kwargs):
        self.choice[key], self.unfactored_choice[key] = ("factored", None), ("plain", None)
        return self.choice[key]

    grads, buffers, log = run_l2l(MODELS[model], l2l=original_l2l)
    monkeypatch.setattr(_common.ModelRunner, "_choose", choose)
    factored = []
    real_stepped = _common.FactoredWeight.stepped
    monkeypatch.setattr(_common.FactoredWeight, "stepped",
                        lambda self, g, x: factored.append(1) or real_stepped(self, g, x))
    g, b, lg = run_l2l(MODELS[model])
    assert factored
    assert_close_lists(g, grads)
    assert_close_lists(b, buffers)
    assert lg[0]["meta_valid_error"] == pytest.approx(log[0]["meta_valid_error"], rel=1e-9)


@pytest.mark.parametrize("model", MODELS)
def test_higher_example_swapped_and_batched_equal_the_real_higher(model):
    real_higher = pytest.importorskip("higher")
    make = MODELS[model]
    grads, buffers, log = run_higher(make, higher=real_higher)
    for source in (None, pe.patched_source("higher")):
        g, b, lg = run_higher(make, source)
        assert_close_lists(g, grads)
        assert_close_lists(b, buffers)  # fnet's statistics are copies: the model's never move
        assert float(lg[0]["loss"]) == pytest.approx(float(log[0]["loss"]), rel=1e-9)
        assert lg[0]["acc"] == pytest.approx(log[0]["acc"], rel=1e-9)


@pytest.mark.parametrize("name", ["l2l", "higher"])
def test_the_readme_diff_applies_with_patch_and_changes_at_most_three_lines(name):
    diff = pe.readme_diff(name)
    changed = [line for line in diff.splitlines() if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
    assert 0 < sum(line.startswith("+") for line in changed) <= 3, changed
    assert sum(line.startswith("-") for line in changed) <= 3, changed
    assert pe.patched_source(name) != pe.EXAMPLES[name].read_text()


@pytest.mark.parametrize("momentum", [1.0, 0.1, None], ids=["momentum1", "momentum0.1", "cumulative"])
def test_running_statistics_of_a_batched_forward(momentum):
    """A batched training forward leaves the running statistics a per-task loop over the same
    forward leaves (each task a batch, in task order); with momentum 1 that is the last task's."""
    torch.manual_seed(1)
    model = peers.OmniglotCNN().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    loop_model = copy.deepcopy(model)
    x = torch.rand(4, 5, 1, 28, 28, dtype=F64)
    maml, loop = compat_l2l.algorithms.MAML(model, lr=0.5), compat_l2l.algorithms.MAML(loop_model, lr=0.5)
    out = maml.clone(tasks=4)(x)
    for t in range(4):
        expected = loop.clone()(x[t])
        torch.testing.assert_close(out.per_task[t], expected, rtol=1e-10, atol=1e-10)
    assert_close_lists(list(model.buffers()), list(loop_model.buffers()))
    if momentum == 1.0:  # the last task's batch statistics
        last = loop_model.base[0].conv(x[3]).detach()
        torch.testing.assert_close(model.base[0].normalize.running_mean, last.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # eval mode: the running statistics, the same for every task
        model.eval(), loop_model.eval()
        out = maml.clone(tasks=4)(x)
        torch.testing.assert_close(out.per_task[2], loop.clone()(x[2]), rtol=1e-10, atol=1e-10)


def test_batched_outputs_work_with_the_examples_own_helpers():
    """TaskOutputs: [T, C, N] for tasks in dim 0 ([N, C, T] in dim 1), so argmax(dim=1) is each
    sample's class and torch's loss functions sum over tasks; other operations give plain tensors."""
    torch.manual_seed(2)
    model = peers.mlp().double()
    x, y = torch.rand(3, 4, 1, 28, 28, dtype=F64), torch.randint(0, 5, (3, 4))
    for task_dim in (0, 1):
        learner = compat_l2l.algorithms.MAML(model, lr=0.5, tasks=3, task_dim=task_dim).clone()
        xs, ys = (x, y) if task_dim == 0 else (x.transpose(0, 1), y.t())
        out = learner(xs)
        per_task = [model(x[t]) for t in range(3)]
        assert out.shape == ((3, 5, 4) if task_dim == 0 else (4, 5, 3))
        pred = out.argmax(dim=1)
        assert type(pred) is torch.Tensor and pred.shape == ys.shape
        assert torch.equal(pred if task_dim == 0 else pred.t(), torch.stack([p.argmax(1) for p in per_task]))
        loss = nn.CrossEntropyLoss()(out, ys)
        expected = sum(nn.functional.cross_entropy(p, y[t]) for t, p in enumerate(per_task))
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        none = nn.functional.cross_entropy(out, ys, reduction="none")
        assert none.shape == ys.shape
