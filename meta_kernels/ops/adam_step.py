"""adam_step / adam_step_: the inner update of torch.optim.Adam for a whole list of tensors in one
launch, with the step count `step` (from 1) shared by every tensor and task,

    u = scale[t] * g_i,  m' = b1 m + (1 - b1) u,  v' = b2 v + (1 - b2) u^2,
    phi_i = theta_i - lrs[i] * rates_i * (m' / c1) / (sqrt(v' / c2) + eps),  c = 1 - b^step

(rates_i: optional per-element rates, Meta-SGD). Checks, fake kernels, autograd and the
front-ends; kernels in csrc/cpu/adam_step.cpp, csrc/cuda/adam_step.cu and
meta_kernels/triton/adam_step.py.

The backward is made of torch ops (differentiable again) and takes the derivative of sqrt as 0
where v' is exactly 0: there every gradient so far was 0 (a dead ReLU), the step is 0 whatever v
does, and the plain derivative (inf) would make the meta-gradient 0 * inf = NaN, as it does in
the peers' differentiable Adam."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, _stateful, reference
from meta_kernels.ops.sgd_step import _as_lrs
from meta_kernels.tensor_utils import to_compute


def check_args(params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, beta1, beta2, eps, step) -> None:
    _stateful.check_args(params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, lrs, scale, rates)
    _checked_hyper(beta1, beta2, eps, step)


def _checked_hyper(beta1, beta2, eps, step) -> None:
    _checks.scalar(beta1, "beta1", "finite and in [0, 1)", lambda v: 0 <= v < 1)
    _checks.scalar(beta2, "beta2", "finite and in [0, 1)", lambda v: 0 <= v < 1)
    _checks.scalar(eps, "eps", "finite and > 0", lambda v: 0 < v < float("inf"))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (the number of this update, as torch.optim.Adam counts), "
                         f"got {step!r}")


# ---- fake kernels ----------------------------------------------------------------------------

def _fake(params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, beta1, beta2, eps, step):
    check_args(params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, beta1, beta2, eps, step)
    new = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]
    return new(params), new(exp_avgs), new(exp_avg_sqs)


def _fake_(params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, beta1, beta2, eps, step):
    check_args(params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, beta1, beta2, eps, step)


# ---- autograd --------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, beta1, beta2, eps, step = inputs
    ctx.n, ctx.has_scale, ctx.has_rates = len(params), scale is not None, rates is not None
    ctx.hyper = (beta1, beta2, eps, 1 - beta1 ** step, 1 - beta2 ** step)
    ctx.like = [(p.shape, p.dtype, p.device) for p in params]
    # The new moments give the direction and its derivatives; the grads the second moment's.
    ctx.save_for_backward(*grads, *output[1], *output[2], lrs, *([scale] if scale is not None else []), *(rates or []))


def _backward(ctx, grad_params, grad_exp_avgs, grad_exp_avg_sqs):
    saved, n = list(ctx.saved_tensors), ctx.n
    grads, m_new, v_new = saved[:n], saved[n:2 * n], saved[2 * n:3 * n]
    rest = saved[3 * n:]
    lrs = rest.pop(0)
    scale = rest.pop(0) if ctx.has_scale else None
    rates = rest if ctx.has_rates else None
    beta1, beta2, eps, c1, c2 = ctx.hyper
    need_p, need_g, need_m, need_v, need_lrs, need_scale, need_rates = ctx.needs_input_grad[:7]
    gp, gm, gv = (_stateful.upstream(g, ctx.like) for g in (grad_params, grad_exp_avgs, grad_exp_avg_sqs))
    dtype = ctx.like[0][1]
    directions, total_m, total_v = [], [], []
    for i, (m, v, go_p, go_m, go_v) in enumerate(zip(m_new, v_new, gp, gm, gv)):
        m, v = to_compute(m), to_compute(v)
        root = (v / c2).sqrt()
        positive = root > 0
        denom = root + eps
        direction = (m / c1) / denom
        grad_dir = -reference.step_rate(lrs, i, rates, go_p) * go_p
        # d root / d v' = 1 / (2 c2 root), taken as 0 where root is 0 (see the module's docstring).
        droot = torch.where(positive, 1 / (2 * c2 * torch.where(positive, root, torch.ones_like(root))),
                            torch.zeros_like(root))
        directions.append(direction)
        total_m.append(go_m + grad_dir / (c1 * denom))
        total_v.append(go_v - grad_dir * direction / denom * droot)
    # d u, the scaled gradient: through m' and through v' = ... + (1 - b2) u^2.
    total_u = None
    if need_g or need_scale:
        total_u = [(1 - beta1) * tm + 2 * (1 - beta2) * reference.scaled_grad(g, scale) * tv
                   for g, tm, tv in zip(grads, total_m, total_v)]
    grad_p = [g.to(dtype) for g in gp] if need_p else None
    grad_g = [reference.scaled_grad(t, scale).to(dtype) for t in total_u] if need_g else None
    grad_m = [(beta1 * t).to(dtype) for t in total_m] if need_m else None
    grad_v = [(beta2 * t).to(dtype) for t in total_v] if need_v else None
    grad_scale = _stateful.scale_gradient(grads, total_u, scale) if need_scale else None
    grad_lrs, grad_rates = _stateful.rate_gradients(directions, gp, lrs, rates, need_lrs, need_rates)
    return grad_p, grad_g, grad_m, grad_v, grad_lrs, grad_scale, grad_rates, None, None, None, None


# ---- front-ends ------------------------------------------------------------------------------

def adam_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], lrs: Tensor | float | Sequence[float], scale: Tensor | None = None,
              rates: Sequence[Tensor] | None = None, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
              step: int, backend: str | None = None) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(new params, new first moments, new second moments) of one Adam update (`step`: its number,
    from 1) for every tensor of the list in one launch. Moments start at zero, as in
    torch.optim.Adam. Differentiable in the tensors (finite where v' is 0)."""
    params, grads = _checks.non_empty(params, "params"), list(grads)
    exp_avgs, exp_avg_sqs, rates = list(exp_avgs), list(exp_avg_sqs), None if rates is None else list(rates)
    _checked_hyper(beta1, beta2, eps, step)  # scalars: cheap enough to check before every backend
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    op = reference.adam_step if name == "reference" else _registry.namespace(name).adam_step
    args = (params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, float(beta1), float(beta2), float(eps), step)
    return _checks.checked_call(name, lambda: check_args(*args[:7], beta1, beta2, eps, step),
                                lambda: tuple(op(*args)))


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], lrs: Tensor | float | Sequence[float], scale: Tensor | None = None,
               rates: Sequence[Tensor] | None = None, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
               step: int, backend: str | None = None) -> None:
    """In-place adam_step (params and both moments) for paths that build no graph."""
    params, grads = _checks.non_empty(params, "params"), list(grads)
    exp_avgs, exp_avg_sqs, rates = list(exp_avgs), list(exp_avg_sqs), None if rates is None else list(rates)
    _checks.no_graph_for_in_place(params + exp_avgs + exp_avg_sqs, "adam_step_")
    _checked_hyper(beta1, beta2, eps, step)  # scalars: cheap enough to check before every backend
    lrs = _as_lrs(lrs, len(params), params[0])
    name = _backend.resolve(backend, params[0].device)
    op = _reference_in_place if name == "reference" else _registry.namespace(name).adam_step_
    args = (params, grads, exp_avgs, exp_avg_sqs, lrs, scale, rates, float(beta1), float(beta2), float(eps), step)
    _checks.checked_call(name, lambda: check_args(*args[:7], beta1, beta2, eps, step), lambda: op(*args))


def _reference_in_place(params, grads, exp_avgs, exp_avg_sqs, *rest) -> None:
    with torch.no_grad():
        new = reference.adam_step(params, grads, exp_avgs, exp_avg_sqs, *rest)
        for t, value in zip(params + exp_avgs + exp_avg_sqs, [x for lst in new for x in lst]):
            t.copy_(value)


# ---- samples for opcheck and the self-check --------------------------------------------------

def _opcheck_cases(device):
    params, grads, m, v, lrs, scale, rates = _stateful.samples(device, True, 2)
    return [("adam_step", (params, grads, m, v, lrs, scale, rates, 0.9, 0.999, 1e-8, 3)),
            ("adam_step", (params, grads, m, v, lrs, None, None, 0.0, 0.99, 1e-3, 1)),
            ("adam_step_", (*_stateful.samples(device, False, 2, seed=1), 0.9, 0.999, 1e-8, 2))]


def _selfcheck(backend: str) -> None:
    params, grads, m, v, lrs, scale, rates = [
        [t.double() for t in x] if isinstance(x, list) else x.double() for x in _stateful.samples("cpu", False, 2, 2)]
    ours = adam_step(params, grads, m, v, lrs, scale, rates, step=2, backend=backend)
    torch.testing.assert_close(ours, reference.adam_step(params, grads, m, v, lrs, scale, rates, 0.9, 0.999, 1e-8, 2))


_SCHEMA_OUT = ("(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor lrs, Tensor? scale, "
               "Tensor[]? rates, float beta1, float beta2, float eps, int step) -> (Tensor[], Tensor[], Tensor[])")
_SCHEMA_IN_PLACE = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
                    "Tensor lrs, Tensor? scale, Tensor[]? rates, float beta1, float beta2, float eps, int step) -> ()")

OP = _registry.add(_registry.OpDef(
    name="adam_step",
    kernels=(_registry.Kernel("adam_step", _SCHEMA_OUT, _fake, lambda ns: (_backward, _setup)),
             _registry.Kernel("adam_step_", _SCHEMA_IN_PLACE, _fake_)),
    backends=_backend.CONCRETE, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck, triton_module="adam_step"))
