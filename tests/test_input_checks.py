"""Inputs that used to pass silently or fail late: learning rates given as lists / tensors /
per-element dicts (checked like a float rate), integer labels of any width, and half-precision
inputs through the inner loop and the query pass."""
import math

import pytest
import torch
import torch.nn.functional as F

import meta_kernels as mk
from meta_kernels.config import MAMLConfig
from meta_kernels.meta import MetaLearner, adapt, meta_loss

STEPS = 2


def _batch(T=2, n_way=3, k=2, q=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n_way * k, 1, size, size, generator=g)
    xq = torch.randn(T, n_way * q, 1, size, size, generator=g)
    ys = torch.arange(n_way).repeat_interleave(k).repeat(T, 1)
    yq = torch.arange(n_way).repeat_interleave(q).repeat(T, 1)
    return xs, ys, xq, yq


def _model(seed=0):
    torch.manual_seed(seed)
    return mk.Conv4(in_channels=1, n_way=3, filters=4, image_size=16)


def _config(algo="maml"):
    return MAMLConfig(algo=algo, inner_steps=STEPS, inner_lr=0.3, inner_clip=1.0, engine="custom")


# ---- learning rates ------------------------------------------------------------------------

BAD_RATES = [-0.1, math.nan, math.inf, -math.inf]


def _rates(kind, n, bad):
    """n rates of 0.1 with the last one `bad`, as a list, a [n] tensor or a [STEPS, n] table."""
    values = [0.1] * (n - 1) + [bad]
    if kind == "list":
        return values
    if kind == "tensor":
        return torch.tensor(values)
    return torch.tensor([values] * STEPS)


@pytest.mark.parametrize("kind", ["list", "tensor", "table"])
@pytest.mark.parametrize("bad", BAD_RATES, ids=str)
def test_bad_rates_as_list_or_tensor_are_refused(kind, bad):
    model = _model()
    params = dict(model.named_parameters())
    xs, ys, _, _ = _batch()
    with pytest.raises(ValueError, match=r"lrs must be finite and >= 0, got \[(-0.1|nan|inf|-inf)"):
        adapt(params, (xs, ys), model=model, steps=STEPS, lrs=_rates(kind, len(params), bad), first_order=True)


@pytest.mark.parametrize("bad", [math.inf, math.nan, 0.0, -1.0], ids=str)
def test_bad_float_rate_is_refused(bad):
    model = _model()
    xs, ys, _, _ = _batch()
    with pytest.raises(ValueError, match=r"inner lr must be > 0 and finite"):
        adapt(dict(model.named_parameters()), (xs, ys), model=model, steps=STEPS, lrs=bad, first_order=True)


def test_learned_rate_table_is_checked_and_keeps_its_graph():
    """An LSLR-like table that requires grad: a NaN entry is refused (before any step), a good one
    still receives its meta-gradient (the check reads the values only)."""
    model = _model()
    params = dict(model.named_parameters())
    batch = _batch()
    table = torch.full((STEPS, len(params)), 0.1, requires_grad=True)
    out = meta_loss(params, batch, config=_config(), model=model, lrs=table, track_curve=False)
    (grad,) = torch.autograd.grad(out.loss, table)
    assert grad.abs().sum() > 0
    bad = table.detach().clone()
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match=r"lrs must be finite and >= 0, got \[nan\]"):
        meta_loss(params, batch, config=_config(), model=model, lrs=bad.requires_grad_(), track_curve=False)


def test_zero_rates_in_a_table_are_allowed():
    """A rate of 0 freezes that parameter (as bn_mode='frozen' does): allowed in a list."""
    model = _model()
    params = dict(model.named_parameters())
    xs, ys, _, _ = _batch()
    rates = [0.0] + [0.1] * (len(params) - 1)
    adapted, _ = adapt(params, (xs, ys), model=model, steps=STEPS, lrs=rates, first_order=True)
    first = next(iter(params))
    assert torch.equal(adapted[first][0], params[first].detach())


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=str)
def test_non_finite_per_element_rates_are_refused(bad):
    """Meta-SGD: per-element rate tensors (requiring grad, as the learner's) are checked for NaN /
    inf; their sign is learned, so negative rates stay allowed."""
    model = _model()
    params = dict(model.named_parameters())
    xs, ys, _, _ = _batch()
    rates = {k: torch.full_like(p.detach(), 0.1).requires_grad_() for k, p in params.items()}
    with torch.no_grad():
        rates["head.bias"][1] = bad
    with pytest.raises(ValueError, match=r"per-element rates \(Meta-SGD\) of head.bias must be finite"):
        adapt(params, (xs, ys), model=model, steps=STEPS, lrs=rates, first_order=True)
    with torch.no_grad():
        rates["head.bias"][1] = -0.1
    adapt(params, (xs, ys), model=model, steps=STEPS, lrs=rates, first_order=True)


def test_nan_in_learned_rates_stops_the_learner_step():
    model = _model()
    learner = MetaLearner(model, _config(), meta_sgd=True, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.no_grad():
        learner.meta_sgd_rates["head.weight"][0, 0] = math.nan
    with pytest.raises(ValueError, match=r"head.weight must be finite"):
        learner.step(_batch())


# ---- integer labels ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_integer_labels_of_any_width_step_as_int64(dtype, algo):
    xs, ys, xq, yq = _batch()
    results = []
    for labels in (torch.int64, dtype):
        model = _model()
        learner = MetaLearner(model, _config(algo), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        metrics = learner.step((xs, ys.to(labels), xq, yq.to(labels)), track_curve=True)
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m64, p64), (m, p) = results
    assert m == m64
    for a, b in zip(p, p64):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8], ids=str)
def test_integer_labels_in_adapt_and_meta_loss(dtype):
    model = _model()
    params = dict(model.named_parameters())
    xs, ys, xq, yq = _batch()
    want, _ = adapt(params, (xs, ys), model=model, steps=STEPS, lrs=0.3, first_order=True)
    got, _ = adapt(params, (xs, ys.to(dtype)), model=model, steps=STEPS, lrs=0.3, first_order=True)
    for k in want:
        assert torch.equal(got[k], want[k])
    single, _ = adapt(params, (xs[0], ys[0].to(dtype)), model=model, steps=STEPS, lrs=0.3, first_order=True)
    # one task alone runs other kernels than two batched (and other thread splits): equal to rounding
    torch.testing.assert_close(single["head.bias"][0], want["head.bias"][0], rtol=1e-5, atol=1e-6)
    loss64 = meta_loss(params, (xs, ys, xq, yq), config=_config(), model=model).loss
    loss = meta_loss(params, (xs, ys.to(dtype), xq, yq.to(dtype)), config=_config(), model=model).loss
    assert torch.equal(loss, loss64)


def test_boolean_and_float_labels_are_still_refused():
    model = _model()
    xs, ys, _, _ = _batch()
    for labels in (ys.float(), ys > 0):
        with pytest.raises(ValueError, match=r"labels must be integer class indices"):
            adapt(dict(model.named_parameters()), (xs, labels), model=model, steps=1, lrs=0.1, first_order=True)


# ---- half-precision inputs -----------------------------------------------------------------

@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile"])
def test_half_inputs_step_as_their_upcast(half, model_dtype, algo):
    """Half inputs with a float32 or float64 model: MetaLearner.step (inner loop and query pass)
    gives what the same inputs upcast to the model's dtype give."""
    xs, ys, xq, yq = _batch()
    xs, xq = xs.to(half), xq.to(half)
    results = []
    for inputs in ((xs, xq), (xs.to(model_dtype), xq.to(model_dtype))):
        model = _model().to(model_dtype)
        learner = MetaLearner(model, _config(algo), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        metrics = learner.step((inputs[0], ys, inputs[1], yq), track_curve=True)
        assert math.isfinite(metrics["query_loss"])
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m, p), (m_up, p_up) = results
    assert m == m_up
    for a, b in zip(p, p_up):
        assert a.dtype == model_dtype and torch.equal(a, b)


def test_half_inputs_through_the_maml_wrapper_query_pass():
    """mk.MAML: adapt on bf16 support inputs, then the query pass under the adapted weights."""
    xs, ys, xq, yq = _batch()
    model = _model()
    maml = mk.MAML(model, lr=0.3)
    outs = []
    for support, query in ((xs[0].bfloat16(), xq[0].bfloat16()), (xs[0].bfloat16().float(), xq[0].bfloat16().float())):
        adapted = maml.adapt(support, ys[0], steps=STEPS)
        outs.append(maml(query, adapted))
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    F.cross_entropy(outs[0], yq[0]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reptile_past_its_epsilon_decay_makes_no_update():
    """reptile_update_ refuses epsilon 0; the learner skips the update once epsilon has decayed to 0."""
    model = _model()
    config = MAMLConfig(algo="reptile", inner_steps=STEPS, inner_lr=0.3, inner_clip=1.0, engine="custom",
                        reptile_decay_steps=1)
    learner = MetaLearner(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    learner.step(_batch())  # epsilon 1: a full step
    before = [p.detach().clone() for p in model.parameters()]
    learner.step(_batch(seed=1))  # epsilon decayed to 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
