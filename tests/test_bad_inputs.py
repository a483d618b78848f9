"""Bad input gets a clear error: one row per case -- the call, the exception type and a phrase of
its message. The next bad input is one new row."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meta_kernels.compat import higher, task_sum
from meta_kernels.compat import learn2learn as l2l
from meta_kernels.meta import NonFiniteLossError
from meta_kernels.models import peers


def _mlp():
    torch.manual_seed(0)
    return peers.mlp(n_way=3, input_size=16, hidden=(8,)).double()


def _data(T=None, n=4):
    shape = (n, 1, 4, 4) if T is None else (T, n, 1, 4, 4)
    x = torch.rand(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, shape[:-3])
    return x, y


def plain_loss_to_batched_learner():
    learner = l2l.algorithms.MAML(_mlp(), lr=0.1).clone(tasks=2)
    x, _ = _data(T=2)
    learner.adapt(learner(x).square().mean())


def task_sum_on_one_task():
    model = _mlp()
    x, y = _data()
    task_sum(F.cross_entropy)(model(x), y)


def non_scalar_loss_to_adapt():
    learner = l2l.algorithms.MAML(_mlp(), lr=0.1).clone()
    x, y = _data()
    learner.adapt(F.cross_entropy(learner(x), y, reduction="none"))


def non_scalar_loss_to_diffopt():
    model = _mlp()
    x, y = _data()
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(x), y, reduction="none"))


def stale_loss():
    learner = l2l.algorithms.MAML(_mlp(), lr=0.1).clone()
    x, y = _data()
    loss = F.cross_entropy(learner(x), y)
    learner.adapt(loss)
    learner.adapt(loss)


def nan_inner_loss(make_loss):
    def case():
        learner = l2l.algorithms.MAML(_mlp(), lr=0.1).clone()
        x, y = _data()
        learner.adapt(F.cross_entropy(learner(x), y))
        learner.adapt(make_loss(learner(x), y))
    return case


def nan_inner_loss_in_higher():
    model = _mlp()
    x, y = _data()
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(x * float("inf")), y))


def meta_sgd_rates_of_other_shapes():
    model = _mlp()
    l2l.algorithms.MetaSGD(model, lrs=[torch.ones(3) for _ in model.parameters()])


def batched_learner_given_one_task():
    learner = l2l.algorithms.MAML(_mlp(), lr=0.1, tasks=3).clone()
    x, _ = _data()
    learner(x)


CASES = [
    # (call, exception, phrase of the message)
    (plain_loss_to_batched_learner, ValueError, "not a sum over the 2 tasks"),
    (task_sum_on_one_task, TypeError, "For a single task, call the loss function itself"),
    (lambda: l2l.algorithms.MAML(lambda x: x, lr=0.1), TypeError, "MAML wraps an nn.Module, got function"),
    (lambda: l2l.algorithms.MetaSGD(None), TypeError, "MetaSGD wraps an nn.Module, got NoneType"),
    (lambda: higher.innerloop_ctx(lambda x: x, None).__enter__(), TypeError, "take an nn.Module, got function"),
    (non_scalar_loss_to_adapt, ValueError, "adapt takes a scalar loss, got one of shape [4]"),
    (non_scalar_loss_to_diffopt, ValueError, "diffopt.step takes a scalar loss"),
    (meta_sgd_rates_of_other_shapes, ValueError, "the rate for 1.weight has shape [3], but the weight has [8, 16]"),
    (lambda: l2l.algorithms.MetaSGD(_mlp(), lrs=[torch.ones(1)]), ValueError, "lrs holds 1 tensors but the model has 4"),
    (stale_loss, ValueError, "this loss was already used by adapt()"),
    (nan_inner_loss(lambda out, y: F.cross_entropy(out, y) * float("nan")), NonFiniteLossError,
     "inner loss at step 2 is nan"),
    (nan_inner_loss_in_higher, NonFiniteLossError, "diffopt.step: the inner loss at step 1"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr=None), TypeError, "lr must be a finite number"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr="0.1"), TypeError, "lr must be a finite number"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr=0.1, tasks=0), ValueError, "tasks must be a positive int"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr=0.1, tasks=2, task_dim=2), ValueError, "task_dim must be 0"),
    (batched_learner_given_one_task, ValueError, "adapts 3 tasks at once with the tasks in dim 0"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr=0.1).adapt(torch.tensor(1.0)), RuntimeError,
     "adapt a clone: learner = maml.clone()"),
    (lambda: higher.optim.create_diff_optim(torch.optim.RMSprop, {"lr": 0.1}, params=[torch.zeros(2)]), ValueError,
     "supports torch.optim.SGD and torch.optim.Adam"),
    (lambda: higher.optim.create_diff_optim(torch.optim.SGD, {"lr": 0.1}), ValueError, "needs params=... "),
    (lambda: l2l.data.stack_tasks(object(), 4), TypeError, "task datasets with a sample() method"),
]


@pytest.mark.parametrize("call,error,phrase", CASES, ids=[getattr(c[0], "__name__", "lambda") + f"-{i}"
                                                          for i, c in enumerate(CASES)])
def test_bad_input_gets_a_clear_error(call, error, phrase):
    with pytest.raises(error) as info:
        call()
    assert phrase in str(info.value), str(info.value)


def test_nonfinite_inner_losses_can_be_allowed_as_the_peers_do():
    learner = l2l.algorithms.MAML(_mlp(), lr=0.1, allow_nonfinite=True).clone()
    x, y = _data()
    learner.adapt(F.cross_entropy(learner(x), y) * float("nan"))
    assert any(torch.isnan(w).any() for w in learner.parameters())
