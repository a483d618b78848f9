"""meta_kernels.compat.higher: higher 0.2's innerloop_ctx contract, closed forms of SGD with
momentum and of Adam, meta_loss and a per-task loop, and the real higher on the same script."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meta_kernels.compat import higher, task_sum
from meta_kernels.config import MAMLConfig
from meta_kernels.meta import meta_loss

from test_compat_learn2learn import assert_all_close, cnn, grads_of, mlp, tasks


class Quadratic(nn.Module):
    """loss(w) = 0.5 * sum(a * w^2) - sum(b * w): gradient a * w - b, elementwise."""

    def __init__(self, n=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, dtype=torch.float64))

    def forward(self, a, b):
        return 0.5 * (a * self.w ** 2).sum() - (b * self.w).sum()


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("track", [True, False], ids=["second_order", "first_order"])
def test_sgd_momentum_equals_its_closed_form_over_three_steps(nesterov, track):
    torch.manual_seed(0)
    model = Quadratic()
    a, b = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    lr, mu, wd = 0.1, 0.9, 0.01
    dampening = 0.0 if nesterov else 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu, dampening=dampening, nesterov=nesterov,
                          weight_decay=wd)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=track) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(a, b))
        w3 = next(fmodel.parameters())
    # By hand, per element: g = (a + wd) w - b is affine in w, so (w, buf) moves by a 2x2 affine map
    # whose derivative in w0 is carried along (J_w, J_buf).
    w, J_w = model.w.detach().clone(), torch.ones(5, dtype=torch.float64)
    buf = J_buf = None
    for step in range(3):
        g, J_g = (a + wd) * w - b, (a + wd) * J_w
        if step == 0:
            buf, J_buf = g, J_g
        else:
            buf, J_buf = mu * buf + (1 - dampening) * g, mu * J_buf + (1 - dampening) * J_g
        d, J_d = (g + mu * buf, J_g + mu * J_buf) if nesterov else (buf, J_buf)
        w, J_w = w - lr * d, J_w - lr * J_d
    torch.testing.assert_close(w3.detach(), w, rtol=1e-12, atol=1e-12)
    if track:  # d sum(w3) / d w0, through three steps
        (grad,) = torch.autograd.grad(w3.sum(), model.w)
        torch.testing.assert_close(grad, J_w, rtol=1e-12, atol=1e-12)
    else:  # higher's first order: every step's weights are fresh leaves, nothing reaches the model
        assert w3.is_leaf and w3.requires_grad
        with pytest.raises(ValueError, match="only the latest"):
            fmodel.parameters(time=1)


def hand_adam(params, grad_fn, steps, lr, betas, eps, weight_decay, amsgrad):
    """torch.optim.Adam's update as plain differentiable tensor operations."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    v_max = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        grads = grad_fn(params)
        new = []
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g + weight_decay * p
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            second = v[i]
            if amsgrad:
                v_max[i] = torch.maximum(v_max[i], v[i])
                second = v_max[i]
            m_hat, v_hat = m[i] / (1 - betas[0] ** t), second / (1 - betas[1] ** t)
            new.append(p - lr * m_hat / (v_hat.sqrt() + eps))  # torch.optim.Adam: eps after the bias correction
        params = new
    return params


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_equals_a_hand_written_differentiable_adam(amsgrad):
    torch.manual_seed(1)
    model = mlp().double()
    xs, ys, xq, yq = tasks(T=1)
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=amsgrad)
    opt = torch.optim.Adam(model.parameters(), **settings)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
        F.cross_entropy(fmodel(xq[0]), yq[0]).backward()
        ours = [p.detach() for p in fmodel.parameters()]
    meta = grads_of(model)
    names = [n for n, _ in model.named_parameters()]
    run = lambda ps: F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), xs[0]), ys[0])
    initial = [p.clone() for p in model.parameters()]
    final = hand_adam(initial, lambda ps: torch.autograd.grad(run(ps), ps, create_graph=True), 3, **settings)
    assert_all_close(ours, [p.detach() for p in final], tol=1e-12)
    query = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, final)), xq[0]), yq[0])
    assert_all_close(meta, list(torch.autograd.grad(query, list(model.parameters()))))


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_diffopt_adam_steps_equal_torch_optim_adam(steps, amsgrad, eps):
    """diffopt.step with Adam gives exactly torch.optim.Adam's weights (float64): eps is added
    after the bias correction of sqrt(v), the step is lr / (1 - beta1^t). A large eps (1e-3) shows
    where eps sits: inside the bias correction it would be 1 / sqrt(1 - beta2) = 31.6x larger at step 1."""
    torch.manual_seed(3)
    model = mlp().double()
    ref = mlp().double()
    ref.load_state_dict(model.state_dict())
    xs, ys, _, _ = tasks(T=1)
    settings = dict(lr=0.01, betas=(0.9, 0.999), eps=eps, weight_decay=0.01, amsgrad=amsgrad)
    reference = torch.optim.Adam(ref.parameters(), **settings)
    for _ in range(steps):
        reference.zero_grad()
        F.cross_entropy(ref(xs[0]), ys[0]).backward()
        reference.step()
    with higher.innerloop_ctx(model, torch.optim.Adam(model.parameters(), **settings)) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
        ours = [p.detach() for p in fmodel.parameters()]
    moved = max(float((p - q).abs().max()) for p, q in zip(ours, model.parameters()))
    assert moved > 1e-3  # the weights did move
    for p, q in zip(ours, ref.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-12)


def test_parameter_groups_override_and_learned_rates():
    torch.manual_seed(2)
    model = mlp().double()
    xs, ys, xq, yq = tasks(T=1)
    opt = torch.optim.SGD([{"params": model[1].parameters(), "lr": 0.1},
                           {"params": model[3].parameters(), "lr": 0.5, "weight_decay": 0.1}])
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        loss = F.cross_entropy(fmodel(xs[0]), ys[0])
        w0 = list(fmodel.parameters())
        grads = torch.autograd.grad(loss, w0, retain_graph=True)
        diffopt.step(loss)
        rates, decay = [0.1, 0.1, 0.5, 0.5], [0, 0, 0.1, 0.1]
        for new, p, g, lr, wd in zip(fmodel.parameters(), w0, grads, rates, decay):
            torch.testing.assert_close(new, p - lr * (g + wd * p), rtol=1e-12, atol=1e-12)

    # One learnable rate per group through override: d query / d lr_k = -g_query . g_support over group k.
    rates = [torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
             torch.tensor(0.3, dtype=torch.float64, requires_grad=True)]
    opt = torch.optim.SGD([{"params": model[1].parameters()}, {"params": model[3].parameters()}], lr=1.0)
    with higher.innerloop_ctx(model, opt, override={"lr": rates}) as (fmodel, diffopt):
        w0 = list(fmodel.parameters())
        g_support = torch.autograd.grad(F.cross_entropy(fmodel(xs[0]), ys[0]), w0)
        diffopt.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
        query = F.cross_entropy(fmodel(xq[0]), yq[0])
        g_query = torch.autograd.grad(query, list(fmodel.parameters()), retain_graph=True)
        query.backward()
    dots = [(g_query[i] * g_support[i]).sum() for i in range(4)]
    torch.testing.assert_close(rates[0].grad, -(dots[0] + dots[1]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rates[1].grad, -(dots[2] + dots[3]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one value, or one per group"):
        with higher.innerloop_ctx(model, opt, override={"lr": [0.1, 0.2, 0.3]}):
            pass


def test_initial_weights_buffers_and_unsupported_optimizers():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = model[1].running_mean.clone()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):  # copy_initial_weights=True: detached copies
        before = fmodel(x)
        diffopt.step(F.cross_entropy(fmodel(x), y))
        F.cross_entropy(fmodel(x), y).backward()
        assert all(p.grad is None for p in model.parameters())
        assert len(list(fmodel.parameters(time=0))) == len(list(model.parameters()))
    assert torch.equal(model[1].running_mean, stats)  # fmodel's statistics are its own copies
    torch.testing.assert_close(before, model(x), rtol=1e-12, atol=1e-12)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(x), y))
        F.cross_entropy(fmodel(x), y).backward()
        assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match=r"supports torch\.optim\.SGD and torch\.optim\.Adam.*RMSprop"):
        with higher.innerloop_ctx(model, torch.optim.RMSprop(model.parameters())):
            pass


@pytest.mark.parametrize("make_model", [cnn, mlp], ids=["cnn_bn", "mlp"])
def test_meta_gradients_equal_meta_loss_and_a_per_task_loop(make_model):
    torch.manual_seed(4)
    model, T, steps, lr = make_model().double(), 3, 2, 0.4
    xs, ys, xq, yq = tasks(T=T)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in range(T):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
            (F.cross_entropy(fmodel(xq[t]), yq[t]) / T).backward()
    ours = grads_of(model)
    cfg = MAMLConfig(inner_steps=steps, inner_lr=lr, inner_clip=None, engine="custom")
    out = meta_loss(dict(model.named_parameters()), (xs, ys, xq, yq), config=cfg, model=model, track_curve=False)
    assert_all_close(ours, list(torch.autograd.grad(out.loss, list(model.parameters()))))


def run_script(lib, model, xs, ys, xq, yq, opt, override=None):
    """A higher user's meta-training step, written once for either library."""
    for t in range(xs.shape[0]):
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
            F.cross_entropy(fmodel(xq[t]), yq[t]).backward()
    return grads_of(model) + ([r.grad.clone() for r in override["lr"]] if override else [])


@pytest.mark.parametrize("make_model", [cnn, mlp], ids=["cnn_bn", "mlp"])
@pytest.mark.parametrize("inner", ["sgd_nesterov", "adam", "sgd_learned_lr"])
def test_the_same_script_through_the_real_higher(make_model, inner):
    real_higher = pytest.importorskip("higher")
    torch.manual_seed(5)
    model = make_model().double()
    batch = tasks(T=2)
    make_opt = {"sgd_nesterov": lambda: torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True,
                                                        weight_decay=1e-3),
                # higher 0.2.1 keeps PyTorch 1.5's Adam (eps inside the bias correction: sqrt(v) + eps, step
                # lr * sqrt(1 - beta2^t) / (1 - beta1^t)); ours is torch.optim.Adam's (sqrt(v) / sqrt(1 - beta2^t)
                # + eps, step lr / (1 - beta1^t): test_diffopt_adam_steps_equal_torch_optim_adam). With eps=0
                # the two are the same update, so the rest of the script is compared exactly.
                "adam": lambda: torch.optim.Adam(model.parameters(), lr=0.01, eps=0.0),
                "sgd_learned_lr": lambda: torch.optim.SGD(model.parameters(), lr=0.1)}[inner]
    results = []
    for lib in (real_higher, higher):
        override = {"lr": [torch.tensor(0.3, dtype=torch.float64, requires_grad=True)]} \
            if inner == "sgd_learned_lr" else None
        results.append(run_script(lib, model, *batch, make_opt(), override))
    assert_all_close(*results)


@pytest.mark.parametrize("inner", ["sgd_momentum", "adam"])
def test_batched_form_equals_the_per_task_loop(inner):
    torch.manual_seed(6)
    model, T = cnn().double(), 3
    xs, ys, xq, yq = tasks(T=T)
    make_opt = {"sgd_momentum": lambda: torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5),
                "adam": lambda: torch.optim.Adam(model.parameters(), lr=0.01)}[inner]
    loop = run_script(higher, model, xs, ys, xq, yq, make_opt())
    loss_fn = task_sum(F.cross_entropy)
    with higher.innerloop_ctx(model, make_opt(), copy_initial_weights=False, tasks=T) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(loss_fn(fmodel(xs), ys))
        assert next(fmodel.parameters()).shape[0] == T
        loss_fn(fmodel(xq), yq).backward()
        with pytest.raises(ValueError, match=r"adapts 3 tasks at once"):
            fmodel(xs[:2])
    assert_all_close(loop, grads_of(model))


def functional_script(lib, model, xs, ys, xq, yq):
    """higher's functional style: monkeypatch, create_diff_optim over the fast weights, explicit
    params through step(loss, params=...) and fmodel(x, params=...), update_params."""
    fmodel = lib.patch.monkeypatch(model, copy_initial_weights=False)
    for t in range(xs.shape[0]):
        diffopt = lib.optim.create_diff_optim(torch.optim.SGD, {"lr": 0.3, "momentum": 0.5}, params=fmodel.parameters())
        params = list(model.parameters())
        fmodel.update_params(params)
        for _ in range(2):
            params = diffopt.step(F.cross_entropy(fmodel(xs[t], params=params), ys[t]), params=params)
        F.cross_entropy(fmodel(xq[t], params=params), yq[t]).backward()
        assert all(a is b for a, b in zip(fmodel.fast_params, params))  # the params of the last call
    return grads_of(model)


@pytest.mark.parametrize("make_model", [cnn, mlp], ids=["cnn_bn", "mlp"])
def test_monkeypatch_and_create_diff_optim_equal_the_real_higher(make_model):
    real_higher = pytest.importorskip("higher")
    batch = tasks(T=2)
    results = []
    for lib in (real_higher, higher):
        torch.manual_seed(7)
        results.append(functional_script(lib, make_model().double(), *batch))
    assert_all_close(*results)


def test_get_diff_optim_with_a_grad_callback_and_differentiable_adam_class():
    torch.manual_seed(8)
    model = mlp().double()
    xs, ys, _, _ = tasks(T=1)
    fmodel = higher.monkeypatch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel, grad_callback=lambda gs: [g * 0 for g in gs])
    before = [p.detach().clone() for p in fmodel.parameters()]
    diffopt.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
    assert_all_close([p.detach() for p in fmodel.parameters()], before)  # every gradient zeroed by the callback
    adam = higher.optim.DifferentiableAdam(torch.optim.Adam(model.parameters(), lr=0.01), model.parameters(),
                                           fmodel=fmodel)
    assert isinstance(adam, higher.optim.DifferentiableOptimizer)
    adam.step(F.cross_entropy(fmodel(xs[0]), ys[0]))
    assert len(list(fmodel.parameters(time=2))) == len(before)
