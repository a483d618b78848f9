"""Bad input gets a clear error: one row per case -- the call, the exception type and a phrase of
its message (CASES: the API; CLI_CASES: the command line, exit code 2 and one line on stderr;
WARNINGS: cases that run, with a warning). The next bad input is one new row."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meta_kernels as mk
from meta_kernels.compat import higher, task_sum
from meta_kernels.compat import learn2learn as l2l
from meta_kernels.config import ConfigError, MAMLConfig, MetaLearningFullConfig, RunConfig
from meta_kernels.meta import NonFiniteLossError, adapt, meta_loss
from meta_kernels.meta.batching import ModelForwardError, TaskMixingError
from meta_kernels.models import peers
from test_runner import REPO, data_env  # noqa: F401 - the fixture


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


# ---- the meta-learning API ------------------------------------------------------------------------

CFG = MAMLConfig(inner_steps=1, inner_lr=0.1, engine="custom")


def _batch(T=2):
    (xs, ys), (xq, yq) = _data(T), _data(T)
    return xs, ys, xq, yq


def _learner(model=None, config=CFG, **kw):
    return mk.MetaLearner(model or _mlp(), config, **kw)


def _frozen():
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Mixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x - x.mean(0))


def _step_with_loss(loss_fn):
    return lambda: _learner(loss_fn=loss_fn).step(_batch())


def _step_on(batch, model=None):
    return lambda: _learner(model).step(batch())


def _conv4_rgb():
    model = mk.Conv4.omniglot(3).double()
    x = torch.rand(2, 3, 3, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 3))
    _learner(model).step((x, y, x, y))


def _wrecked_by_meta_lr():
    learner = _learner(_mlp().float(), MAMLConfig(inner_steps=1, inner_lr=0.1, meta_lr=1e30, engine="custom"))
    batch = tuple(t.float() if t.is_floating_point() else t for t in _batch())
    learner.step(batch)  # weights near 1e30 after this meta-update: the next inner loss overflows
    learner.step(batch)


def _other_models_params():
    model, other = _mlp(), peers.mlp(n_way=5, input_size=16, hidden=(8,)).double()
    xs, ys = _data(T=2)
    adapt(dict(other.named_parameters()), (xs, ys), model=model, steps=1, lrs=0.1, first_order=False)


def _maml():
    return mk.MAML(_mlp(), lr=0.1)


def _forward_with_other_params():
    other = mk.MAML(peers.mlp(n_way=5, input_size=16, hidden=(8,)).double(), lr=0.1).adapt(*_data(T=2))
    _maml()(_data(T=2)[0], other)


def _forward_with_more_tasks():
    maml = _maml()
    maml(_data(T=3)[0], maml.adapt(*_data(T=2)))


def _params_without(name):
    params = dict(_mlp().named_parameters())
    del params[name]
    return params


def _meta_sgd_rates_plus(extra):
    rates = {k: torch.full_like(p, 0.1) for k, p in _mlp().named_parameters()}
    rates[extra] = torch.ones(1)
    return rates


def _adapt(params=None, support=None, **kw):
    model = _mlp()
    return lambda: adapt(dict(model.named_parameters()) if params is None else params(),
                         _data(T=2) if support is None else support(), model=model, steps=1,
                         first_order=False, **{"lrs": 0.1, **kw})


def _mutated_algo():
    config = MAMLConfig(inner_steps=1, inner_lr=0.1, engine="custom")
    config.algo = "banana"
    _learner(config=config).step(_batch())


def _one_hot(width, **kw):
    def case():
        xs, ys, xq, yq = _batch()
        _learner(**kw).step((xs, F.one_hot(ys, width).double(), xq, F.one_hot(yq, width).double()))
    return case


def _nan_meta_sgd_rate():
    model = _mlp()
    rates = [torch.full_like(p, 0.1) for p in model.parameters()]
    rates[0][0, 0] = float("nan")
    l2l.algorithms.MetaSGD(model, lrs=rates)


def _diffopt_step(loss_of=None, params=None, override=None):
    def case():
        model = _mlp()
        x, y = _data()
        with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), override=override) as (fmodel, diffopt):
            out = (loss_of or (lambda fm: F.cross_entropy(fm(x), y)))(fmodel)
            diffopt.step(out, params=None if params is None else params(fmodel))
            return fmodel
    return case


def _fmodel_time_100():
    _diffopt_step()().parameters(time=100)


def _fmodel_params_of_other_shapes():
    model = _mlp()
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, _):
        fmodel(_data()[0], params=[torch.zeros(2) for _ in range(4)])


API_CASES = [
    (lambda: mk.MetaLearner(_mlp(), None), TypeError, "config must be a MAMLConfig"),
    (lambda: mk.MetaLearner(_mlp(), {"inner_lr": 0.1}), TypeError, "(a dict of fields: MAMLConfig(**fields))"),
    (lambda: meta_loss({}, _batch(), config=None, model=_mlp()), TypeError, "meta_loss: config must be a MAMLConfig"),
    (lambda: mk.MetaLearner(lambda x: x, CFG), TypeError, "model must be a torch nn.Module, got function"),
    (lambda: mk.MetaLearner(_mlp(), CFG, optimizer=torch.optim.SGD(_mlp().parameters(), 0.1)), ValueError,
     "the optimizer holds none of Sequential's parameters"),
    (lambda: mk.MetaLearner(_frozen(), CFG), ValueError, "no parameter of Sequential requires grad"),
    (lambda: mk.MAML(_frozen(), lr=0.1).adapt(*_data()), ValueError, "MAML.adapt: no parameter of Sequential"),
    (lambda: mk.MAML(lambda x: x, lr=0.1), TypeError, "MAML wraps an nn.Module, got function"),
    (lambda: mk.MAML(None, lr=0.1), TypeError, "MAML wraps an nn.Module, got NoneType"),
    (lambda: mk.MAML(_mlp(), lr=None), ValueError, "lr must be a finite number > 0"),
    (lambda: mk.MAML(_mlp(), lr="0.1"), ValueError, "got '0.1'"),
    (_step_with_loss(lambda out, y: 1.0), TypeError, "loss_fn returned float (1.0), not a tensor"),
    (_step_with_loss(lambda out, y: torch.tensor(1.0)), ValueError, "does not depend on the outputs"),
    (_step_with_loss(lambda out, y: (out.argmax(-1) == y).sum()), TypeError, "a loss must be floating point"),
    (lambda: _learner(Mixing()).step(_batch()), TaskMixingError, "mixes samples across the batch"),
    (lambda: _learner(compile="banana"), ValueError, "compile='banana' is not a torch.compile backend"),
    (lambda: adapt(dict(_mlp().named_parameters()), torch.rand(2, 4, 1, 4, 4), model=_mlp(), steps=1, lrs=0.1,
                   first_order=False), ValueError, "support_batch must be a pair (x, y)"),
    (lambda: adapt(dict(_mlp().named_parameters()), (*_data(T=2), _data(T=2)[1]), model=_mlp(), steps=1, lrs=0.1,
                   first_order=False), ValueError, "got a tuple of 3"),
    (_other_models_params, ValueError, "params are not Sequential's: other shapes: 3.weight [5, 8]"),
    (_step_on(lambda: (*_data(T=2), torch.rand(2, 4, 1, 5, 5, dtype=torch.float64), _data(T=2)[1])), ValueError,
     "support samples have shape [(1, 4, 4)] but query samples [(1, 5, 5)]"),
    (_step_on(lambda: (torch.rand(2, 4, 1, 5, 5), _data(T=2)[1], torch.rand(2, 4, 1, 5, 5), _data(T=2)[1])),
     ModelForwardError, "forward failed on the task batch's inputs ([2, 4, 1, 5, 5]"),
    (_step_on(lambda: ((torch.rand(2, 4, 1, 4, 4) * 9).long(), _data(T=2)[1], (torch.rand(2, 4, 1, 4, 4) * 9).long(),
                       _data(T=2)[1])), ModelForwardError, "images must be floating point"),
    (_step_on(lambda: tuple(t[:0] for t in _batch())), ValueError, "the task batch holds 0 tasks"),
    (_conv4_rgb, ValueError, "layer blocks.0.conv (Conv2d) takes 1 input channel(s) per sample, got 3"),
    (_wrecked_by_meta_lr, NonFiniteLossError, "non-finite inner loss at inner step 0, before any inner update"),
    (lambda: MAMLConfig(inner_lr=1e308), ConfigError, "inner_lr: must be > 0 and at most 3.4e+38"),
    (lambda: MAMLConfig(meta_lr=1e39), ConfigError, "meta_lr: must be > 0 and at most 3.4e+38"),
    (lambda: mk.MAML(_mlp(), lr=0.1, first_order="False"), TypeError, "first_order must be True or False, got 'False'"),
    (lambda: mk.MAML(_mlp(), lr=0.1, inner_clip=0), ValueError, "MAML: inner_clip must be a number > 0"),
    (lambda: mk.MAML(_mlp(), lr=torch.tensor(-1.0)), ValueError, "lr must be a finite number > 0"),
    (lambda: _maml().adapt(*_data(), steps=True), ValueError, "steps must be an integer >= 1, got True"),
    (lambda: _maml().adapt(_data()[0], None), TypeError, "MAML.adapt: y (the targets) must be a tensor"),
    (lambda: _maml().adapt(*(t.numpy() for t in _data())), TypeError, "convert it with torch.from_numpy"),
    (lambda: _maml()(_data()[0], {}), ValueError, "MAML.forward: params is empty"),
    (_forward_with_other_params, ValueError, "MAML.forward: params are not Sequential's: other shapes"),
    (_forward_with_more_tasks, ValueError, "the adapted weights hold 2 task(s) but x holds 3"),
    (lambda: mk.MAML(mk.Conv4(in_channels=1, n_way=3, filters=4, image_size=28), lr=0.1).adapt(
        torch.rand(2, 3, 1, 8, 8), torch.randint(0, 3, (2, 3))), ValueError, "the inputs' 8x8 images are too small"),
    (lambda: mk.Conv4.omniglot(n_way=2.5), ValueError, "Conv4: n_way must be an integer >= 2, got 2.5"),
    (lambda: mk.Conv4(in_channels=1, n_way=3, filters=0), ValueError, "Conv4: filters must be an integer >= 1, got 0"),
    (_adapt(params=lambda: list(_mlp().parameters())), TypeError, "params must be a dict name -> tensor"),
    (_adapt(params=lambda: _params_without("3.bias")), ValueError, "params lack ['3.bias'] of Sequential"),
    (_adapt(lrs="0.1"), ValueError, "lrs (the inner learning rate) must be a float > 0"),
    (_adapt(lrs=None), ValueError, "got NoneType None"),
    (_adapt(lrs=_meta_sgd_rates_plus("nope")), ValueError, "per-element rates (Meta-SGD) name ['nope']"),
    (_adapt(support=lambda: (_data(T=2)[0], None)), TypeError, "support: y (the targets) must be a tensor"),
    (lambda: _learner(mamlpp={"use_lslr": True}), TypeError, "mamlpp must be a MAMLPlusPlusConfig or None (a dict"),
    (lambda: _learner(meta_sgd="False"), TypeError, "meta_sgd must be True or False, got 'False'"),
    (_step_with_loss(lambda out: out.sum()), TypeError, "loss_fn is called as loss_fn(outputs, targets)"),
    (_step_with_loss(lambda out, y: None), TypeError, "loss_fn returned NoneType (None), not a tensor"),
    (_mutated_algo, ConfigError, "MAMLConfig.algo: unknown algorithm 'banana'"),
    (lambda: _learner().load_state_dict({"foo": 1}), ValueError, "the state lacks ['outer_steps', 'optimizer']"),
    (lambda: mk.explain(_mlp(), config={"inner_lr": 1}), TypeError, "explain: config must be a MAMLConfig"),
    (lambda: mk.params_without_meta_grad(None), TypeError, "params_without_meta_grad takes the nn.Module"),
    (lambda: mk.check_adapted_graph({}, dict(_mlp().named_parameters())), ValueError,
     "check_adapted_graph: adapted is empty"),
    (lambda: RunConfig(device="tpu"), ConfigError, "RunConfig.device: unknown device 'tpu'"),
    (lambda: _learner(_mlp().half()), ValueError, "the model's weights are float16, which torch.optim.Adam"),
    (_step_on(lambda: (_batch()[0].to("meta"), *_batch()[1:])), ValueError,
     "support inputs are on meta, but the model's weights on cpu"),
    (_step_on(lambda: (_batch()[0], _batch()[1].to("meta"), *_batch()[2:])), ValueError,
     "support labels / targets are on meta"),
    (_one_hot(5), ValueError, "soft targets [2, 4, 5] do not match the model's outputs [2, 4, 3]"),
    (_one_hot(5, loss_fn=F.cross_entropy), ValueError, "targets [2, 4, 5] do not match the model's outputs [2, 4, 3]"),
]


# ---- the compat layers ---------------------------------------------------------------------------

COMPAT_CASES = [
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
    (lambda: l2l.algorithms.MAML(_mlp(), lr=0), ValueError, "MAML: lr must be > 0"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr=-1.0), ValueError, "MAML: lr must be > 0"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr=0.1, first_order="False"), TypeError,
     "MAML: first_order must be True or False, got 'False'"),
    (lambda: l2l.algorithms.MAML(_mlp(), lr=0.1).clone(first_order="no"), TypeError,
     "first_order must be True or False, got 'no'"),
    (_nan_meta_sgd_rate, ValueError, "MetaSGD: the rate for 1.weight must be finite, got [nan]"),
    (lambda: l2l.clone_module(None), TypeError, "clone_module takes an nn.Module, got NoneType"),
    (lambda: l2l.clone_module("x"), TypeError, "clone_module takes an nn.Module, got str"),
    (lambda: l2l.detach_module(None), TypeError, "detach_module takes an nn.Module, got NoneType"),
    (lambda: l2l.clone_parameters([1, 2]), TypeError, "clone_parameters takes tensors (e.g. model.parameters()), got int"),
    (_diffopt_step(override={"lr": [-1.0]}), ValueError, "override['lr'] must be > 0"),
    (_diffopt_step(override={"lr": [float("nan")]}), TypeError, "override['lr'] must be a finite number"),
    (_diffopt_step(override={"banana": [1]}), ValueError, "unknown hyperparameter 'banana'; torch.optim.SGD has"),
    (_diffopt_step(loss_of=lambda fm: F.cross_entropy(_mlp()(_data()[0]), _data()[1])), ValueError,
     "diffopt.step: the loss does not depend on the fast weights"),
    (_diffopt_step(params=lambda fm: list(fm.parameters())[:2]), ValueError,
     "diffopt.step: params holds 2 tensors but the model has 4 weights"),
    (_fmodel_params_of_other_shapes, ValueError, "params[0] has shape [2], but the weight 1.weight has [8, 16]"),
    (_fmodel_time_100, ValueError, "time=100, but fmodel holds the weights of times 0..1"),
]


CASES = API_CASES + COMPAT_CASES


@pytest.mark.parametrize("call,error,phrase", CASES, ids=[getattr(c[0], "__name__", "lambda") + f"-{i}"
                                                          for i, c in enumerate(CASES)])
def test_bad_input_gets_a_clear_error(call, error, phrase):
    with pytest.raises(error) as info:
        call()
    assert phrase in str(info.value), str(info.value)


def test_a_diverging_inner_loop_warns_once_and_reports_its_growth():
    learner = _learner(config=MAMLConfig(inner_steps=2, inner_lr=1e6, inner_clip=None, engine="custom"))
    with pytest.warns(UserWarning, match=r"the inner loop diverges: at outer step 1 the loss grew .*x"):
        metrics = learner.step(_batch())
    assert metrics["adaptation_loss_growth"] > 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert learner.step(_batch())["adaptation_loss_growth"] > 1e6
    assert _learner().step(_batch())["adaptation_loss_growth"] < 10


def test_an_optimizer_missing_some_parameters_warns():
    model = _mlp()
    with pytest.warns(UserWarning, match=r"leaves out 2 trainable parameter\(s\) of the model \(3.weight, 3.bias\)"):
        mk.MetaLearner(model, CFG, optimizer=torch.optim.SGD(model[1].parameters(), 0.1))


def _every_task_nan():
    learner = _learner(config=MAMLConfig(inner_steps=1, inner_lr=0.1, engine="custom", skip_nonfinite_tasks=True))
    xs, ys, xq, yq = _batch()
    learner.step((xs * float("nan"), ys, xq, yq))


# Cases that run, with a warning: (call, warning type, phrase of its message).
WARNING_CASES = [
    (_every_task_nan, UserWarning, "every task of the meta-batch (2) was skipped for a non-finite inner loss"),
]


@pytest.mark.parametrize("call,warning,phrase", WARNING_CASES, ids=[c[2][:30] for c in WARNING_CASES])
def test_questionable_input_runs_with_a_clear_warning(call, warning, phrase):
    with pytest.warns(warning) as record:
        call()
    assert any(phrase in str(w.message) for w in record), [str(w.message) for w in record]


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.unused = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _valid_edge_cases():
    """Inputs that were refused though valid: each runs now (the name says what it checks)."""
    def tensor_lr_equals_float_lr():
        x, y = _data(T=2)
        a = mk.MAML(_mlp(), lr=torch.tensor(0.1, dtype=torch.float64)).adapt(x, y)
        b = mk.MAML(_mlp(), lr=0.1).adapt(x, y)
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-15) for k in a)

    def bf16_model():
        model = _mlp().bfloat16()
        xs, ys, xq, yq = _batch()
        metrics = _learner(model).step((xs.bfloat16(), ys, xq.bfloat16(), yq))
        assert metrics["query_loss"] == metrics["query_loss"] and model[1].weight.dtype == torch.bfloat16

    def soft_targets_under_the_default_loss():
        xs, ys, xq, yq = _batch()
        soft = _learner().step((xs, F.one_hot(ys, 3).double(), xq, F.one_hot(yq, 3).double()))
        hard = _learner().step((xs, ys, xq, yq))
        assert abs(soft["query_loss"] - hard["query_loss"]) < 1e-12

    def an_unused_parameter():
        model = _Unused().double()
        _learner(model).step(_batch())
        assert "unused" in mk.params_without_meta_grad(model) and "fc.weight" not in mk.params_without_meta_grad(model)

    def inputs_with_zero_features():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: initializing zero-element tensors is a no-op
            model = nn.Linear(0, 3).double()
        x, y = torch.zeros(2, 4, 0, dtype=torch.float64), torch.randint(0, 3, (2, 4))
        _learner(model).step((x, y, x, y))

    return [tensor_lr_equals_float_lr, bf16_model, soft_targets_under_the_default_loss, an_unused_parameter,
            inputs_with_zero_features]


@pytest.mark.parametrize("case", _valid_edge_cases(), ids=lambda c: c.__name__)
def test_valid_edge_cases_run(case):
    case()


# ---- the command line: exit code 2, one line naming the field or flag ----------------------------

def _cli(args, capsys):
    from meta_kernels.cli import main
    code = main(args)
    return code, capsys.readouterr().err


CLI_CASES = [
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    (["--set", "run.device=cuda"], "run.device='cuda', but this torch has no CUDA device"),
    (["--set", "maml.inner_lr=1e308"], "MAMLConfig.inner_lr: must be > 0 and at most 3.4e+38"),
    (["--set", "maml.meta_lr=1e39"], "MAMLConfig.meta_lr: must be > 0 and at most 3.4e+38"),
    (["--model", "tests.user_factory:raises"], "model.factory 'tests.user_factory:raises' raised KeyError"),
    (["--model", "tests.user_factory:wrong_width"], "gives [7] outputs per sample, but episodes.n_way is 5"),
    (["--config", "my.yaml"], "--config my.yaml and --preset minimal exclude each other"),
    (["--out", ""], "--out: an empty path; name the output folder"),
    (["--set", "run.device=tpu"], "RunConfig.device: unknown device 'tpu'; use cpu or cuda[:N]"),
    (["--model", "tests.user_factory:no_params"], "built a model with no trainable parameters"),
]


@pytest.mark.parametrize("extra,phrase", CLI_CASES, ids=[c[1][:30] for c in CLI_CASES])
def test_bad_command_lines_exit_2_with_one_clear_line(data_env, tmp_path, capsys, monkeypatch, extra, phrase):
    if "cuda" in " ".join(extra) and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    monkeypatch.syspath_prepend(str(REPO))
    code, err = _cli(["train", "--preset", "minimal", "--set", "mamlpp.bn_mode=transductive", "--out",
                      str(tmp_path / "run"), *extra], capsys)
    assert code == 2 and phrase in err, err
    assert "Traceback" not in err or "raised" in phrase  # a factory's own traceback is shown, ours never


def test_a_folder_without_a_checkpoint_is_reused_and_resume_says_so(data_env, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run killed before its first save
    code, err = _cli(["train", "--preset", "minimal", "--resume", "--out", str(out)], capsys)
    assert code == 2 and "no checkpoint" in err and "start afresh without --resume" in err, err
    from meta_kernels.train import Trainer
    with pytest.warns(UserWarning, match="saved no checkpoint"):
        Trainer(MetaLearningFullConfig.minimal().with_overrides(["mamlpp.bn_mode=transductive"]), out, progress=False)
    assert not (out / "metrics.jsonl").exists()


def test_eval_of_a_checkpoint_with_another_architecture_names_the_keys(data_env, tmp_path):
    from meta_kernels.checkpoint import CheckpointError, save_checkpoint
    from meta_kernels.train import load_checkpoint_model
    config = MetaLearningFullConfig.minimal()
    path = save_checkpoint(tmp_path / "other.pt", {"config": config.to_dict(), "model": {"fc.weight": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match=r"does not match the checkpoint's weights: missing \['blocks.0.bn.bias'"):
        load_checkpoint_model(path, {"model": {"fc.weight": torch.zeros(2)}}, config, (1, 28, 28))


def test_nonfinite_inner_losses_can_be_allowed_as_the_peers_do():
    learner = l2l.algorithms.MAML(_mlp(), lr=0.1, allow_nonfinite=True).clone()
    x, y = _data()
    learner.adapt(F.cross_entropy(learner(x), y) * float("nan"))
    assert any(torch.isnan(w).any() for w in learner.parameters())


@pytest.mark.parametrize("payload,extra,phrase", [
    (lambda c: {"model": {}}, [], "holds no config ('config' entry is missing"),
    (lambda c: {"config": c}, [], "holds no model weights ('model' entry is missing"),
    (lambda c: {"config": c, "model": {}}, ["--model", "tests.user_factory:small_cnn"],
     "has no model factory: its model is built in (arch 'conv4'), so --model is not needed"),
], ids=["no-config", "no-model", "model-not-needed"])
def test_eval_of_an_incomplete_checkpoint_or_an_unneeded_model_exits_2(data_env, tmp_path, capsys, monkeypatch,
                                                                       payload, extra, phrase):
    from meta_kernels.checkpoint import save_checkpoint
    monkeypatch.syspath_prepend(str(REPO))
    config = MetaLearningFullConfig.minimal().with_overrides(["mamlpp.bn_mode=transductive"]).to_dict()
    path = save_checkpoint(tmp_path / "crafted.pt", payload(config))
    code, err = _cli(["eval", "--checkpoint", str(path), "--episodes", "2", "--out", str(tmp_path / "ev"), *extra], capsys)
    assert code == 2 and phrase.replace("('config' entry", "(its 'config' entry").replace(
        "('model' entry", "(its 'model' entry") in err and "Traceback" not in err, err


def test_resume_past_max_steps_warns_and_resume_without_the_model_factory_says_to_pass_it(data_env, tmp_path,
                                                                                        monkeypatch):
    from meta_kernels.checkpoint import CheckpointError
    from meta_kernels.train import Trainer
    monkeypatch.syspath_prepend(str(REPO))
    config = MetaLearningFullConfig.minimal().with_overrides(["mamlpp.bn_mode=transductive", "run.val_every=100"])
    Trainer(config, tmp_path / "run", progress=False).fit(max_steps=2)
    with pytest.warns(UserWarning, match=r"max_steps=1 \(--max-steps 1\): the run in .* is already at step 2"):
        assert Trainer(config, tmp_path / "run", resume=True, progress=False).fit(max_steps=1)["global_step"] == 2
    own = config.with_overrides(["model.factory=tests.user_factory:small_cnn"])
    Trainer(own, tmp_path / "own", progress=False).fit(max_steps=1)
    with pytest.raises(CheckpointError, match="pass --model tests.user_factory:small_cnn again to resume it"):
        Trainer(config, tmp_path / "own", resume=True, progress=False)


def test_ctrl_c_during_start_up_stops_the_command_with_130(data_env, tmp_path):
    """A background job starts with SIGINT ignored (as `meta-kernels train ... &` in a script):
    a SIGINT while the imports run is kept, and the command stops with 130, no traceback."""
    import signal
    import subprocess
    import sys
    import time
    script = __import__("pathlib").Path(sys.executable).parent / "meta-kernels"
    if not script.exists():
        pytest.skip("the meta-kernels command is not installed")
    child = subprocess.Popen([str(script), "train", "--preset", "minimal", "--set", "mamlpp.bn_mode=transductive",
                              "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130 and "Traceback" not in err, err
    assert not list((tmp_path / "run").glob("checkpoints/*.pt")) or "stopped by SIGINT" in err, err
