"""The meta-gradient invariants: hand-computed MAML/FOMAML gradients on a linear model, finite
differences, BN against a primitive-op per-task loop, engines and batching modes agreeing, the
detach detector, fp32 under autocast, clipping, Reptile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meta_kernels.config import MAMLConfig
from meta_kernels.meta import (DetachedGraphError, MetaLearner, TaskModel, adapt, check_adapted_graph, meta_backward,
                               meta_loss, params_without_meta_grad)
from meta_kernels.models import Conv4
from meta_kernels.models.conv4 import StepBatchNorm

F64 = torch.float64


def _linear_tasks(T=3, n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    return mk(T, n, d), mk(T, n, 1), mk(T, n + 2, d), mk(T, n + 2, 1)


def _hand_maml_grad(w, xs, ys, xq, yq, alpha, steps, first_order):
    """Mean over tasks of d L_q(w_K) / d w for w_{k+1} = w_k - alpha * grad L_s(w_k), MSE loss.
    grad L(w) = 2/n X^T (X w - y); Hessian H = 2/n X^T X (constant), so dw_K/dw = (I - alpha H)^K."""
    total = torch.zeros_like(w)
    for t in range(xs.shape[0]):
        X, Y, Xq, Yq = xs[t], ys[t], xq[t], yq[t]
        H = 2 / X.shape[0] * X.T @ X
        wk = w.clone()
        for _ in range(steps):
            wk = wk - alpha * (2 / X.shape[0] * X.T @ (X @ wk - Y))
        gq = 2 / Xq.shape[0] * Xq.T @ (Xq @ wk - Yq)
        jac = torch.eye(w.shape[0], dtype=F64) if first_order else torch.matrix_power(torch.eye(w.shape[0], dtype=F64) - alpha * H, steps)
        total += jac.T @ gq
    return total / xs.shape[0]


@pytest.mark.parametrize("engine", ["custom", "torch_func", "higher"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_linear_model_meta_gradient_matches_hand_computed(engine, steps, algo):
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    xs, ys, xq, yq = _linear_tasks()
    cfg = MAMLConfig(algo=algo, inner_steps=steps, inner_lr=0.1, inner_clip=None, engine=engine, loss="mse")
    params = dict(model.named_parameters())
    loss, _, logs = meta_loss(params, (xs, ys, xq, yq), config=cfg, model=model, track_curve=engine != "higher")
    loss.backward()
    w = model.weight.detach().T  # [d, 1]
    expected = _hand_maml_grad(w, xs, ys, xq, yq, 0.1, steps, first_order=algo == "fomaml")
    torch.testing.assert_close(model.weight.grad.T, expected, rtol=0, atol=1e-12)
    assert model.weight.grad.abs().sum() > 0
    assert params_without_meta_grad(model) == []


def test_maml_keeps_second_order_graph_and_fomaml_does_not():
    model = nn.Linear(4, 1, bias=False).double()
    xs, ys, _, _ = _linear_tasks()
    params = dict(model.named_parameters())
    adapted, _ = adapt(params, (xs, ys), model=model, steps=2, lrs=0.1, first_order=False, loss="mse")
    assert all(v.grad_fn is not None for v in adapted.values())
    # Second order: the adapted weights' gradient w.r.t. w is (I - aH)^2, not I.
    jac = torch.autograd.grad(adapted["weight"][0].sum(), model.weight, create_graph=True)[0]
    assert not torch.allclose(jac, torch.ones_like(jac))
    fo, _ = adapt(params, (xs, ys), model=model, steps=2, lrs=0.1, first_order=True, loss="mse")
    jac_fo = torch.autograd.grad(fo["weight"][0].sum(), model.weight, retain_graph=True)[0]
    torch.testing.assert_close(jac_fo, torch.ones_like(jac_fo))  # identity path only: no graph through the grads
    check_adapted_graph(fo, params)  # still connected to the base params


def test_detach_detector_catches_a_detached_inner_loop():
    model = nn.Linear(4, 1, bias=False).double()
    xs, ys, _, _ = _linear_tasks()
    params = dict(model.named_parameters())
    adapted, _ = adapt(params, (xs, ys), model=model, steps=1, lrs=0.1, first_order=False, loss="mse")
    check_adapted_graph(adapted, params)
    broken = {k: v.detach() for k, v in adapted.items()}  # the classic bug
    with pytest.raises(DetachedGraphError, match=r"\['weight'\] are detached"):
        check_adapted_graph(broken, params)
    no_graph, _ = adapt(params, (xs, ys), model=model, steps=1, lrs=0.1, first_order=True, no_graph=True, loss="mse")
    with pytest.raises(DetachedGraphError):
        check_adapted_graph(no_graph, params)


def _tiny_conv4(seed=0):
    torch.manual_seed(seed)
    model = Conv4(in_channels=1, n_way=3, filters=4, image_size=16).double()
    for m in model.modules():  # non-trivial BN affine so its gradients matter
        if isinstance(m, StepBatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model


def _tasks(T=3, n_way=3, k=2, q=3, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n_way * k, 1, size, size, generator=g, dtype=F64)
    xq = torch.randn(T, n_way * q, 1, size, size, generator=g, dtype=F64)
    ys = torch.arange(n_way).repeat_interleave(k).repeat(T, 1)
    yq = torch.arange(n_way).repeat_interleave(q).repeat(T, 1)
    return xs, ys, xq, yq


def _primitive_conv4(params, x):
    """Conv4 forward for one task with BatchNorm written in primitive ops (the trusted reference)."""
    h = x
    for i in range(4):
        h = F.conv2d(h, params[f"blocks.{i}.conv.weight"], params[f"blocks.{i}.conv.bias"], padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5)
        h = h * params[f"blocks.{i}.bn.weight"].view(1, -1, 1, 1) + params[f"blocks.{i}.bn.bias"].view(1, -1, 1, 1)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), params["head.weight"], params["head.bias"])


def _loop_meta_grad(model, batch, steps, lr, first_order=False):
    xs, ys, xq, yq = batch
    params = dict(model.named_parameters())
    total = 0
    for t in range(xs.shape[0]):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(_primitive_conv4(fast, xs[t]), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(_primitive_conv4(fast, xq[t]), yq[t]) / xs.shape[0]
    return torch.autograd.grad(total, list(params.values()))


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_maml_with_batch_norm_matches_primitive_op_loop(backend):
    model = _tiny_conv4()
    batch = _tasks()
    expected = _loop_meta_grad(model, batch, steps=2, lr=0.3)
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.3, inner_clip=None, engine="custom", backend=backend)
    params = dict(model.named_parameters())
    loss, _, _ = meta_loss(params, batch, config=cfg, model=model, track_curve=False)
    got = torch.autograd.grad(loss, list(params.values()))
    for name, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_engines_and_batching_modes_agree():
    model = _tiny_conv4(2)
    batch = _tasks(seed=3)
    params = dict(model.named_parameters())
    grads = {}
    for engine, batching in [("custom", "batched"), ("torch_func", "batched"), ("higher", "batched"),
                             ("custom", "loop"), ("torch_func", "loop")]:
        cfg = MAMLConfig(inner_steps=2, inner_lr=0.3, inner_clip=None, engine=engine)
        loss, _, _ = meta_loss(params, batch, config=cfg, model=TaskModel(model, batching),
                               track_curve=engine != "higher")
        grads[(engine, batching)] = torch.autograd.grad(loss, list(params.values()))
    ref = grads[("custom", "batched")]
    for key, got in grads.items():
        for name, a, b in zip(params, got, ref):
            assert (a - b).abs().max() <= 1e-10, (key, name)


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(5)
    xs, xq = torch.randn(2, 6, 3, generator=g, dtype=F64), torch.randn(2, 9, 3, generator=g, dtype=F64)
    ys, yq = torch.randint(0, 3, (2, 6), generator=g), torch.randint(0, 3, (2, 9), generator=g)
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.5, inner_clip=None, engine="custom")
    params = dict(model.named_parameters())

    def objective(p):
        return meta_loss(p, (xs, ys, xq, yq), config=cfg, model=model, track_curve=False).loss

    grads = torch.autograd.grad(objective(params), list(params.values()))
    direction = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    eps = 1e-6
    with torch.no_grad():
        plus = objective({k: v + eps * direction[k] for k, v in params.items()})
        minus = objective({k: v - eps * direction[k] for k, v in params.items()})
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, params))
    assert abs(float(numeric - analytic)) < 1e-7 * max(1.0, abs(float(analytic)))


def test_inner_loop_runs_in_fp32_under_autocast():
    torch.manual_seed(6)
    model = Conv4(in_channels=1, n_way=3, filters=4, image_size=16)
    xs, ys, _, _ = (t.float() if t.is_floating_point() else t for t in _tasks(seed=7))
    params = dict(model.named_parameters())
    plain, _ = adapt(params, (xs, ys), model=model, steps=2, lrs=0.3, first_order=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, logs = adapt(params, (xs, ys), model=model, steps=2, lrs=0.3, first_order=True)
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is really on here
    for k in plain:
        assert auto[k].dtype == torch.float32
        torch.testing.assert_close(auto[k], plain[k], rtol=0, atol=0)  # bf16 math would differ


def test_per_step_clipping_matches_reference():
    model = nn.Linear(4, 1, bias=False).double()
    xs, ys, _, _ = _linear_tasks(seed=8)
    ys = ys * 50  # large gradients so the clip engages
    params = dict(model.named_parameters())
    adapted, logs = adapt(params, (xs, ys), model=model, steps=2, lrs=0.1, first_order=False, inner_clip=1.0,
                          loss="mse")
    w0 = model.weight.detach()
    for t in range(xs.shape[0]):
        w = w0.clone()
        for _ in range(2):
            p = w.clone().requires_grad_()
            loss = ((xs[t] @ p.T - ys[t]) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, p)
            factor = min(1.0, 1.0 / (float(grad.norm()) + 1e-6))
            w = w - 0.1 * factor * grad
        torch.testing.assert_close(adapted["weight"][t].detach(), w, rtol=1e-12, atol=1e-12)
    assert logs[0].clip_factor < 1.0 and logs[0].grad_norm > 1.0


def test_reptile_update_matches_hand_written_loop():
    torch.manual_seed(9)
    model = nn.Linear(4, 1).double()
    xs, ys, xq, yq = _linear_tasks(seed=10)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = MAMLConfig(algo="reptile", inner_steps=3, inner_lr=0.05, inner_clip=None, reptile_epsilon=0.5,
                     reptile_decay_steps=4, loss="mse")
    learner = MetaLearner(model, cfg)
    learner.step((xs, ys, xq, yq))
    learner.step((xs, ys, xq, yq))
    for outer in range(2):
        eps = 0.5 * (1 - outer / 4)
        adapted = []
        for t in range(xs.shape[0]):
            w = {k: v.clone() for k, v in theta.items()}
            x_all, y_all = torch.cat([xs[t], xq[t]]), torch.cat([ys[t], yq[t]])  # Reptile uses all task data
            for _ in range(3):
                p = {k: v.clone().requires_grad_() for k, v in w.items()}
                loss = ((x_all @ p["weight"].T + p["bias"] - y_all) ** 2).mean()
                grads = torch.autograd.grad(loss, list(p.values()))
                w = {k: v - 0.05 * g for (k, v), g in zip(w.items(), grads)}
            adapted.append(w)
        theta = {k: v + eps * (torch.stack([a[k] for a in adapted]).mean(0) - v) for k, v in theta.items()}
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), theta[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_task_chunks_give_the_same_step(algo):
    batch = _tasks(T=4, seed=11)
    results = []
    for chunk, query_chunk in ((0, 0), (1, 8), (3, 2), (0, 3)):
        model = _tiny_conv4(12)
        cfg = MAMLConfig(algo=algo, inner_steps=2, inner_lr=0.3, inner_clip=None, engine="custom", task_chunk=chunk,
                         query_chunk=query_chunk)
        learner = MetaLearner(model, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        learner.step(batch)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_meta_backward_chunked_query_equals_meta_loss(algo):
    """The query pass a chunk of tasks at a time, then one backward through the inner loop: the
    gradients of meta_loss(...).loss.backward() (learned per-step rates included), and the same
    metrics, also with a task skipped for a non-finite query loss."""
    xs, ys, xq, yq = _tasks(T=5, seed=21)
    xq[3, 0, 0, 0, 0] = float("nan")
    model = _tiny_conv4(22)
    lrs = torch.full((2, len(list(model.parameters()))), 0.3, dtype=F64, requires_grad=True)
    params = dict(model.named_parameters())
    leaves = list(params.values()) + [lrs]
    grads = []
    for chunk in (0, 2):
        cfg = MAMLConfig(algo=algo, inner_steps=2, inner_lr=0.3, inner_clip=None, engine="custom", query_chunk=chunk,
                         skip_nonfinite_tasks=True)
        if chunk == 0:
            out = meta_loss(params, (xs, ys, xq, yq), config=cfg, model=model, lrs=lrs, track_curve=False)
            (out.loss * 0.5).backward()
            metrics = out.metrics
        else:
            got = meta_backward(params, (xs, ys, xq, yq), config=cfg, model=model, lrs=lrs, scale=0.5)
        grads.append([p.grad.clone() for p in leaves])
        for p in leaves:
            p.grad = None
    assert got["skipped_tasks"] == metrics["skipped_tasks"] == 1
    assert got["query_loss"] == pytest.approx(metrics["query_loss"], rel=1e-12)
    assert got["post_adapt_acc"] == pytest.approx(metrics["post_adapt_acc"], rel=1e-6)  # accuracies are float32
    for name, a, b in zip([*params, "lrs"], *grads):
        # A conv bias before batch norm has no effect on the loss: its gradient is 0 (or rounding noise).
        assert a.abs().sum() > 0 or name.endswith("conv.bias"), name
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("engine", ["custom", "torch_func"])
def test_recomputed_inner_loop_gives_the_full_graph_gradients(engine, steps):
    """recompute_inner rebuilds one inner step's graph at a time: the gradients of the base weights
    and of learned per-step rates equal those through the whole graph, with the clip factor in the
    graph and a task skipped for a non-finite support loss."""
    xs, ys, xq, yq = _tasks(T=4, seed=31)
    xs[2, 1, 0, 3, 3] = float("nan")
    model = _tiny_conv4(32)
    lrs = torch.rand(steps, len(list(model.parameters())), dtype=F64).mul(0.3).add(0.1).requires_grad_()
    params = dict(model.named_parameters())
    leaves = list(params.values()) + [lrs]
    grads, metrics = [], []
    for recompute in (False, True):
        cfg = MAMLConfig(algo="maml", inner_steps=steps, inner_lr=0.3, inner_clip=0.5, engine=engine, query_chunk=3,
                         skip_nonfinite_tasks=True, recompute_inner=recompute)
        metrics.append(meta_backward(params, (xs, ys, xq, yq), config=cfg, model=model, lrs=lrs, scale=0.7))
        grads.append([p.grad.clone() for p in leaves])
        for p in leaves:
            p.grad = None
    assert metrics[1]["skipped_tasks"] == 1
    assert metrics[1]["query_loss"] == pytest.approx(metrics[0]["query_loss"], rel=1e-12)
    for name, a, b in zip([*params, "lrs"], *grads):
        # A conv bias before batch norm has no effect on the loss: its gradient is 0 (or rounding noise).
        assert a.abs().sum() > 0 or name.endswith("conv.bias"), name
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("task_batching", ["loop", "batched"])
def test_recomputed_inner_loop_replays_dropout(task_batching):
    """Each rebuilt step draws the dropout masks it drew in the forward pass (the tasks in a loop,
    or folded into one batch by the engine)."""
    batch = _linear_tasks(T=3, n=8, d=6, seed=5)
    results = []
    for recompute in (False, True):
        torch.manual_seed(40)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)).double()
        cfg = MAMLConfig(algo="maml", inner_steps=3, inner_lr=0.1, inner_clip=None, engine="custom", loss="mse",
                         recompute_inner=recompute, task_chunk=2)
        learner = MetaLearner(model, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              task_batching=task_batching)
        torch.manual_seed(41)
        learner.step(batch)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    assert not torch.equal(results[0][0], nn.Sequential(nn.Linear(6, 16)).double()[0].weight)


def test_recompute_inner_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="recompute_inner"):
        MAMLConfig(algo="fomaml", recompute_inner=True)
    cfg = MAMLConfig(algo="maml", engine="custom", recompute_inner=True)
    model = _tiny_conv4()
    with pytest.raises(ValueError, match="meta_backward or MetaLearner.step"):
        meta_loss(dict(model.named_parameters()), _tasks(), config=cfg, model=model)
    from meta_kernels.config import MAMLPlusPlusConfig
    with pytest.raises(ValueError, match="recompute_inner supports transductive"):
        MetaLearner(model, cfg, mamlpp=MAMLPlusPlusConfig(use_msl=True, bn_mode="transductive"))


def test_meta_backward_refuses_reptile():
    cfg = MAMLConfig(algo="reptile", engine="custom")
    with pytest.raises(ValueError, match="MAML and FOMAML"):
        meta_backward(dict(_tiny_conv4().named_parameters()), _tasks(), config=cfg, model=_tiny_conv4())


def test_reptile_meta_optimizer_update_steps_on_the_pseudo_gradient():
    """reptile_update='meta_optimizer': theta - mean adapted is the gradient of the meta-optimizer."""
    torch.manual_seed(9)
    xs, ys, xq, yq = _linear_tasks(seed=10)
    cfg = MAMLConfig(algo="reptile", inner_steps=3, inner_lr=0.05, inner_clip=None, loss="mse", meta_lr=0.01,
                     reptile_update="meta_optimizer")
    model = nn.Linear(4, 1).double()
    reference = nn.Linear(4, 1).double()
    reference.load_state_dict(model.state_dict())
    learner = MetaLearner(model, cfg)
    interpolating = MetaLearner(reference, cfg.replace(reptile_update="interpolate"))
    adam = torch.optim.Adam(reference.parameters(), lr=0.01)
    for _ in range(2):
        learner.step((xs, ys, xq, yq))
        before = [p.detach().clone() for p in reference.parameters()]
        interpolating.step((xs, ys, xq, yq))  # epsilon 1: the weights become the mean adapted ones
        with torch.no_grad():
            for p, b in zip(reference.parameters(), before):
                p.grad = b - p  # theta - mean adapted, then back to theta
                p.copy_(b)
        adam.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="reptile_update: 'meta_optimizer' is Reptile's outer update"):
        MAMLConfig(algo="maml", reptile_update="meta_optimizer")
    with pytest.raises(ValueError, match="leave reptile_decay_steps at 0"):
        MAMLConfig(algo="reptile", reptile_update="meta_optimizer", reptile_decay_steps=10)


def test_inner_mini_batches_take_each_tasks_examples_in_its_own_cycling_order():
    """inner_batch (Reptile, Nichol et al.): step k of task t takes the examples at positions
    k*b .. k*b+b-1 (mod N) of its own random order, drawn once per inner loop."""
    from meta_kernels.meta.inner import adapt_tasks
    from meta_kernels.meta.inner_common import InnerLoopSettings
    xs, ys, _, _ = _linear_tasks(T=3, n=6)
    model = nn.Linear(4, 1).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    settings = InnerLoopSettings(steps=4, first_order=True, no_graph=True, inner_batch=4, loss="mse")
    torch.manual_seed(5)
    got = adapt_tasks(params, (xs, ys), model=model, settings=settings, lrs=0.1).adapted
    torch.manual_seed(5)
    order = torch.rand(3, 6).argsort(1)
    for t in range(3):
        w, b = params["weight"].clone(), params["bias"].clone()
        for k in range(4):
            pick = order[t, (k * 4 + torch.arange(4)) % 6]
            x, y = xs[t, pick], ys[t, pick]
            residual = x @ w.T + b - y  # mse: mean of residual^2
            w, b = w - 0.1 * 2 * residual.T @ x / 4, b - 0.1 * 2 * residual.mean(0)
        torch.testing.assert_close(got["weight"][t], w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["bias"][t], b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="inner_batch: draws each inner step's samples, for Reptile"):
        MAMLConfig(algo="maml", inner_batch=4)
    with pytest.raises(ValueError, match="only an inner loop without a graph"):
        adapt_tasks(params, (xs, ys), model=model, settings=settings.replace(no_graph=False), lrs=0.1)
