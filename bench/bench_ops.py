"""Fused ops against the best plain-PyTorch equivalent on the Conv4 parameter set, T = 1, 8, 32.

Run: pytest bench/bench_ops.py --benchmark-json=bench/results/ops.json
     python bench/summarize.py bench/results/ops.json

Each case times ours and the baselines in alternation inside one test (shared-machine noise
hits both alike) and stores the medians and ratios in extra_info; pytest-benchmark's own
statistics are for our op."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import meta_kernels as mk
from meta_kernels.ops import _registry
from _common import conv4_shapes, interleaved_medians, machine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OURS = ["cuda", "triton"] if DEVICE == "cuda" else ["cpp"]
TASKS = [1, 8, 32]
MAX_NORM = 10.0


def _params(T: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(T)
    shapes = conv4_shapes()
    params = [torch.randn((T,) + s, generator=g).to(DEVICE, dtype) for s in shapes]
    grads = [torch.randn((T,) + s, generator=g).to(DEVICE, dtype) for s in shapes]
    lrs = torch.linspace(0.01, 0.1, len(shapes), device=DEVICE)
    return params, grads, lrs


def _task_view(v, like):
    return v.view((-1,) + (1,) * (like.dim() - 1))


def foreach_sgd_step(params, grads, neg_lrs):
    return torch._foreach_add(params, torch._foreach_mul(grads, neg_lrs))


def foreach_clip_sgd_step(params, grads, neg_lrs, T):
    """Per-task clip + per-tensor-lr step as plain PyTorch does it best: a norm per tensor and
    task, then foreach multiplies and adds (for T = 1 the norm is clip_grad_norm_'s foreach path)."""
    if T == 1:
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        factor = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
        scaled = torch._foreach_mul(grads, factor)
    else:
        per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(T, -1), dim=1) for g in grads])
        factor = torch.clamp(MAX_NORM / (torch.linalg.vector_norm(per_tensor, dim=0) + 1e-6), max=1.0)
        scaled = torch._foreach_mul(grads, [_task_view(factor, g) for g in grads])
    return torch._foreach_add(params, torch._foreach_mul(scaled, neg_lrs))


def _record(benchmark, ours_name, medians, ours_fn):
    ours = medians[ours_name]
    benchmark.extra_info.update(
        {"machine": machine(), "median_s": medians,
         "speedup_vs": {k: v / ours for k, v in medians.items() if k != ours_name}})
    benchmark.pedantic(ours_fn, rounds=10, iterations=3, warmup_rounds=2)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_clip_and_sgd_step(benchmark, backend, T):
    benchmark.group = f"clip+sgd_step T={T}"
    params, grads, lrs = _params(T)
    neg_lrs = (-lrs).tolist()

    def ours():
        _, factor = mk.clip_grad_norm(grads, MAX_NORM, backend=backend)
        return mk.sgd_step(params, grads, lrs, factor, backend=backend)

    torch.testing.assert_close(ours(), foreach_clip_sgd_step(params, grads, neg_lrs, T))
    medians = interleaved_medians({backend: ours, "foreach": lambda: foreach_clip_sgd_step(params, grads, neg_lrs, T)})
    _record(benchmark, backend, medians, ours)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_sgd_step(benchmark, backend, T):
    benchmark.group = f"sgd_step T={T}"
    params, grads, lrs = _params(T)
    neg_lrs = (-lrs).tolist()
    ours = lambda: mk.sgd_step(params, grads, lrs, backend=backend)
    medians = interleaved_medians({backend: ours, "foreach": lambda: foreach_sgd_step(params, grads, neg_lrs)})
    _record(benchmark, backend, medians, ours)


def foreach_momentum_(params, grads, bufs, lr, momentum):
    """torch.optim.SGD(momentum, foreach=True)'s update."""
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_add_(params, bufs, alpha=-lr)


def foreach_adam_(params, grads, m, v, lr, beta1, beta2, eps, step):
    """torch.optim.Adam(foreach=True)'s update (step given as a number)."""
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    torch._foreach_lerp_(m, grads, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, c2 ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, -lr / c1)


def fused_adam_(params, grads, m, v, lr, beta1, beta2, eps, step):
    """torch.optim.Adam(fused=True)'s kernel (one CPU/CUDA kernel per tensor)."""
    steps = [torch.tensor(float(step - 1))] * len(params)  # the kernel counts the step itself
    torch._fused_adam_(params, grads, m, v, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                       weight_decay=0.0, eps=eps, maximize=False)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_momentum_step(benchmark, backend, T):
    benchmark.group = f"momentum_step_ T={T}"
    params, grads, _ = _params(T)
    bufs = [torch.zeros_like(p) for p in params]
    ours = lambda: mk.momentum_step_(params, grads, bufs, 0.05, momentum=0.9, backend=backend)
    medians = interleaved_medians({backend: ours, "foreach": lambda: foreach_momentum_(params, grads, bufs, 0.05, 0.9)})
    _record(benchmark, backend, medians, ours)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_adam_step(benchmark, backend, T):
    benchmark.group = f"adam_step_ T={T}"
    params, grads, _ = _params(T)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=3)
    check = [[t.clone() for t in lst] for lst in (params, m, v)]
    mk.adam_step_(*check[:1], grads, *check[1:], 0.05, **hyper, backend=backend)
    want = [[t.clone() for t in lst] for lst in (params, m, v)]
    foreach_adam_(want[0], grads, want[1], want[2], 0.05, **hyper)
    torch.testing.assert_close(check, want)
    ours = lambda: mk.adam_step_(params, grads, m, v, 0.05, **hyper, backend=backend)
    medians = interleaved_medians({backend: ours, "foreach": lambda: foreach_adam_(params, grads, m, v, 0.05, **hyper),
                                   "fused": lambda: fused_adam_(params, grads, m, v, 0.05, **hyper)})
    _record(benchmark, backend, medians, ours)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_clip_grad_norm(benchmark, backend, T):
    benchmark.group = f"clip_grad_norm T={T}"
    _, grads, _ = _params(T)
    ours = lambda: mk.clip_grad_norm(grads, MAX_NORM, backend=backend)

    def per_task_torch():
        # clip_grad_norm_'s foreach norm on each task's tensors
        return torch.stack([torch.nn.utils.get_total_norm([g[t] for g in grads], foreach=True) for t in range(T)])

    medians = interleaved_medians({backend: ours, "get_total_norm(foreach) per task": per_task_torch})
    _record(benchmark, backend, medians, ours)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_reptile_update(benchmark, backend, T):
    benchmark.group = f"reptile_update_ T={T}"
    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(s, generator=g).to(DEVICE) for s in conv4_shapes()]
    adapted = [torch.randn((T,) + s, generator=g).to(DEVICE) for s in conv4_shapes()]
    ours = lambda: mk.reptile_update_(theta, adapted, 0.1, backend=backend)
    foreach = lambda: torch._foreach_lerp_(theta, [a.mean(0) for a in adapted], 0.1)
    medians = interleaved_medians({backend: ours, "foreach_lerp_": foreach})
    _record(benchmark, backend, medians, ours)


# Conv4 activations entering each BN on an Omniglot 5-way 1-shot support set: [T, 5, 64, H, W].
BN_SPATIAL = [28, 14, 7, 3]


def _bn_layers(T: int, seed: int):
    """(x, weight, bias, a tensor of x's shape) for each BN_SPATIAL layer, x [T, 5, 64, hw, hw]."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for hw in BN_SPATIAL:
        x = torch.randn(T, 5, 64, hw, hw, generator=g).to(DEVICE).requires_grad_()
        w = torch.rand(T, 64, generator=g).to(DEVICE).requires_grad_()
        b = torch.randn(T, 64, generator=g).to(DEVICE).requires_grad_()
        layers.append((x, w, b, torch.randn(T, 5, 64, hw, hw, generator=g).to(DEVICE)))
    return layers


def _bn_per_task(x, w, b):
    """The plain-PyTorch baseline: F.batch_norm task by task."""
    return torch.stack([F.batch_norm(x[t], None, None, w[t], b[t], True) for t in range(x.shape[0])])


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_batch_norm_forward_backward(benchmark, backend, T):
    benchmark.group = f"batch_norm fwd+bwd T={T}"
    layers = _bn_layers(T, seed=1)

    def run(bn):
        for x, w, b, go in layers:
            torch.autograd.grad(bn(x, w, b), (x, w, b), go)

    ours = lambda: run(lambda x, w, b: mk.batch_norm(x, w, b, backend=backend))
    loop = lambda: run(_bn_per_task)
    vmapped = torch.func.vmap(lambda x, w, b: F.batch_norm(x, None, None, w, b, True))
    vmap = lambda: run(vmapped)
    medians = interleaved_medians({backend: ours, "F.batch_norm loop": loop, "F.batch_norm vmap": vmap})
    _record(benchmark, backend, medians, ours)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_batch_norm_second_order(benchmark, backend, T):
    """MAML's use of BN: the inner gradient with create_graph, then the meta-gradient through it
    (our fused double backward vs aten's BatchNorm double backward), on the same four layers."""
    benchmark.group = f"batch_norm second order T={T}"
    layers = _bn_layers(T, seed=3)

    def run(bn):
        for x, w, b, target in layers:
            inner = (bn(x, w, b) * target).square().sum()
            gx, gw, gb = torch.autograd.grad(inner, (x, w, b), create_graph=True)
            torch.autograd.grad((gx * target).sum() + gw.square().sum() + gb.square().sum(), (x, w, b))

    ours = lambda: run(lambda x, w, b: mk.batch_norm(x, w, b, backend=backend))
    loop = lambda: run(_bn_per_task)
    medians = interleaved_medians({backend: ours, "closed form in torch ops": lambda: _composed(ours, backend),
                                   "F.batch_norm loop": loop})
    _record(benchmark, backend, medians, ours)


def _composed(fn, backend):
    """fn() with batch_norm's double backward in torch ops (its form before the fused kernel)."""
    closed_form = sys.modules["meta_kernels.ops.batch_norm"].double_backward
    ns = _registry.namespace(backend)
    fused = ns.batch_norm_double_backward
    ns.batch_norm_double_backward = lambda *args: closed_form(*args)
    try:
        return fn()
    finally:
        ns.batch_norm_double_backward = fused


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_max_pool2x2_relu_forward_backward(benchmark, backend, T):
    """Conv4's four pool + ReLU layers on an Omniglot 5-way 1-shot 15-query set ([N, T*64, H, W]
    as in Conv4.forward_tasks), forward and backward, against F.relu(F.max_pool2d(x, 2))."""
    benchmark.group = f"max_pool2x2_relu fwd+bwd T={T}"
    g = torch.Generator().manual_seed(2)
    layers = []
    for hw in (28, 14, 7, 3):
        x = torch.randn(20, T * 64, hw, hw, generator=g).to(DEVICE).requires_grad_()
        layers.append((x, torch.randn(20, T * 64, hw // 2, hw // 2, generator=g).to(DEVICE)))

    def run(pool):
        for x, go in layers:
            torch.autograd.grad(pool(x), x, go)

    ours = lambda: run(lambda x: mk.max_pool2x2_relu(x, backend=backend))
    torch_pool = lambda: run(lambda x: F.relu(F.max_pool2d(x, 2)))
    medians = interleaved_medians({backend: ours, "F.relu(F.max_pool2d)": torch_pool}, rounds=7, inner=2)
    _record(benchmark, backend, medians, ours)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("T", TASKS)
def test_max_pool2x2_relu_gather(benchmark, backend, T):
    """The pool backward's adjoint (MAML's double backward) on Conv4's four pool inputs of a 5-way
    1-shot support set ([5, T*64, H, W]): the gather kernel against the same gather in plain
    PyTorch ops (the reference: four strided window corners selected by `where`)."""
    from meta_kernels.ops import reference
    benchmark.group = f"max_pool2x2_relu_gather T={T}"
    ns = torch.ops.meta_kernels if backend in ("cpp", "cuda") else torch.ops.meta_kernels_triton
    g = torch.Generator().manual_seed(3)
    layers = []
    for hw in (28, 14, 7, 3):
        x = torch.randn(5, T * 64, hw, hw, generator=g).to(DEVICE)
        layers.append((torch.randn(x.shape, generator=g).to(DEVICE), ns.max_pool2x2_relu(x)[1]))
    ours = lambda: [ns.max_pool2x2_relu_gather(gx, index) for gx, index in layers]
    plain = lambda: [reference.max_pool2x2_relu_gather(gx, index) for gx, index in layers]
    medians = interleaved_medians({backend: ours, "torch where chain": plain}, rounds=7, inner=3)
    _record(benchmark, backend, medians, ours)


@pytest.mark.skipif(DEVICE != "cpu", reason="conv3x3_bn_pool_relu has a CPU kernel only")
@pytest.mark.parametrize("N,T", [(75, 1), (5, 8), (5, 32)], ids=["query-T1", "support-T8", "support-T32"])
def test_conv3x3_bn_pool_relu_forward_backward(benchmark, N, T):
    """Conv4's input block (conv 3x3 1->64, batch norm, ReLU, pool) on Omniglot 28x28 -- one task's
    15-query set, or the 1-shot support sets of T tasks as grouped convs -- forward and the
    backward of weight, bias, gamma and beta: the fused op against the composed ops Conv4 used
    before (F.conv2d, our batch_norm and max_pool2x2_relu) and plain PyTorch."""
    benchmark.group = f"conv3x3_bn_pool_relu fwd+bwd N={N} T={T}"
    g = torch.Generator().manual_seed(4)
    x = torch.rand(N, T, 28, 28, generator=g)
    leaves = [t.requires_grad_() for t in (torch.randn(T * 64, 1, 3, 3, generator=g), torch.randn(T * 64, generator=g),
                                           torch.rand(T * 64, generator=g) + 0.5, torch.randn(T * 64, generator=g))]
    go = torch.randn(N, T * 64, 14, 14, generator=g)

    def composed(x, w, b, gamma, beta):
        h = F.conv2d(x, w, b, padding=1, groups=T)
        return mk.max_pool2x2_relu(mk.batch_norm(h.unsqueeze(0), gamma.unsqueeze(0), beta.unsqueeze(0)).squeeze(0))

    def plain(x, w, b, gamma, beta):
        h = F.conv2d(x, w, b, padding=1, groups=T)
        return F.relu(F.max_pool2d(F.batch_norm(h, None, None, gamma, beta, True), 2))

    run = lambda block: lambda: torch.autograd.grad(block(x, *leaves), leaves, go)
    ours = run(lambda *a: mk.conv3x3_bn_pool_relu(*a, groups=T, backend="cpp"))
    medians = interleaved_medians({"cpp": ours, "composed ops": run(composed), "plain PyTorch": run(plain)},
                                  rounds=7, inner=3)
    _record(benchmark, "cpp", medians, ours)
