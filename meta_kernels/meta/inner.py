"""The inner loop: T tasks adapt together, every update through the fused ops.

    adapted, logs = adapt(params, (x_support, y_support), model=model, steps=5, lrs=0.4,
                          first_order=False)

`params` are the base weights {name: tensor}; the support batch is x [T, N*K, ...], y [T, N*K]
(a single task without the T dim works too). Adapted weights come back as {name: [T, *shape]}.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch
from torch import Tensor

import meta_kernels.ops as ops
from meta_kernels.ops import reference
from meta_kernels.meta.batching import _TaskLinear
from meta_kernels.meta.factored import FactoredWeight, entry_grads, factored_rank_limit, placeholder
from meta_kernels.meta.higher_engine import adapt_with_higher
from meta_kernels.meta.inner_common import (AdaptResult, CarriedState, InnerLoopSettings, InnerOptimizer, NonFiniteLossError, StepLog, as_task_batch,
                                            check_devices, check_rates, check_same_samples, support_parts, compute_inputs, lead_tensor, lr_table, map_inputs, masked_mean,
                                            per_task_loss, query_pass)
from meta_kernels.meta.task_model import TaskModel, as_task_model
from meta_kernels.tensor_utils import compute_dtype, task_view, to_compute


def adapt(params: dict[str, Tensor], support_batch, *, model, steps: int, lrs, first_order: bool,
          bn_mode: str = "transductive", rng: torch.Generator | None = None, inner_clip: float | None = None,
          engine: str = "custom", backend: str | None = None, no_graph: bool = False, query_batch=None,
          on_nonfinite: str = "raise", loss="cross_entropy", msl_weights: Tensor | None = None,
          adapt_params=None, inner_optimizer: str | InnerOptimizer = "sgd") -> tuple[dict[str, Tensor], list[StepLog]]:
    """Adapts `params` on the support set of every task; returns (adapted_params, inner_logs).

    first_order=False keeps the second-order graph (MAML): adapted params keep grad_fn.
    first_order=True (FOMAML) uses gradients without create_graph; adapted params still depend
    on `params` through the identity path. no_graph=True (Reptile, evaluation) builds no graph
    and updates in place. The inner loop always computes in float32 (autocast off).

    lrs: a float, one rate per parameter, or a [steps, n_params] table (LSLR; may require grad).
    bn_mode: 'transductive' (statistics of the current set), 'per_step' (the same, with the BN
    affine row of the current step), 'frozen' (running statistics; BN affine not adapted).
    msl_weights [steps]: with a query batch, the multi-step loss sum_k w_k L_query(after k+1
    updates) is returned in AdaptResult.msl_loss_per_task (adapt_tasks).
    loss: 'cross_entropy', 'mse' or a callable loss_fn(outputs, targets) -> scalar (per task);
    adapt_params: names or a predicate(name, tensor) of the adapted parameters (default: every one
    that requires grad); the others come back as [T, *shape] views of the base.
    inner_optimizer: 'sgd', 'momentum', 'adam', or InnerOptimizer('adam', betas=(0.0, 0.999)) for
    other settings; its state is per task and starts at zero in every call."""
    settings = InnerLoopSettings(steps=steps, first_order=first_order, bn_mode=bn_mode, inner_clip=inner_clip,
                                 engine=engine, backend=backend, no_graph=no_graph, on_nonfinite=on_nonfinite, loss=loss,
                                 adapt_params=adapt_params, optimizer=inner_optimizer)
    result = adapt_tasks(params, support_batch, model=model, settings=settings, lrs=lrs, query_batch=query_batch,
                         msl_weights=msl_weights, rng=rng)
    return result.adapted, result.logs


def adapt_tasks(params: dict[str, Tensor], support_batch, *, model, settings: InnerLoopSettings, lrs,
                query_batch=None, msl_weights: Tensor | None = None,
                rng: torch.Generator | None = None, start_state: CarriedState | None = None) -> AdaptResult:
    """`adapt` with everything it measured (adaptation curve, skipped tasks), the inner loop
    described by `settings`. start_state: the inner optimizer's state to start from (no graph
    only), instead of zeros.

    settings.recompute (second order only): the inner loop runs without a graph, keeping each
    step's starting weights; AdaptResult.backward then rebuilds the steps' second-order graphs one
    at a time, last first, so memory holds one step's graph instead of all of them, for one more
    first-order pass of compute. The gradients are those of backward through the full graph."""
    task_model = as_task_model(model)
    if settings.engine == "higher":
        if settings.bn_mode != "transductive" or msl_weights is not None:
            raise ValueError("engine='higher' supports neither bn_mode other than 'transductive' nor MSL; use 'custom'")
        return adapt_with_higher(params, support_batch, task_model=task_model, settings=settings, lrs=lrs,
                                 query_batch=query_batch)
    steps = settings.steps
    if msl_weights is not None and (query_batch is None or tuple(msl_weights.shape) != (steps,)):
        raise ValueError(f"msl_weights must be [{steps}] (one per inner step) and needs a query batch, "
                         f"got {None if msl_weights is None else list(msl_weights.shape)}")
    if settings.recompute and (settings.first_order or settings.no_graph or msl_weights is not None):
        raise ValueError("recompute=True rebuilds the second-order graph of MAML: it needs first_order=False, "
                         "no_graph=False and no multi-step loss (msl_weights)")
    if settings.inner_batch and not settings.no_graph:
        raise ValueError(f"inner_batch={settings.inner_batch} draws each inner step's samples, which only an inner loop "
                         "without a graph (Reptile, evaluation) supports; use inner_batch=0")
    if start_state is not None and not (settings.no_graph and settings.optimizer.has_state):
        raise ValueError("start_state carries an inner optimizer's state, which runs without a graph (Reptile): it "
                         "needs no_graph=True and an inner optimizer with state ('momentum' or 'adam')")
    _check_params_of(params, task_model.model)
    x, y = as_task_batch(*support_parts(support_batch), "support", settings.loss)
    check_devices(x, y, next(iter(params.values())).device, "support")
    query = None
    if query_batch is not None:
        query = as_task_batch(*support_parts(query_batch, "query_batch"), "query", settings.loss)
        check_devices(*query, next(iter(params.values())).device, "query")
        check_same_samples(x, query[0])
        if lead_tensor(query[0]).shape[0] != lead_tensor(x).shape[0]:
            raise ValueError(f"support has {lead_tensor(x).shape[0]} tasks but query has "
                             f"{lead_tensor(query[0]).shape[0]}; they must match")
    T = lead_tensor(x).shape[0]
    names = list(params)
    adapted = settings.adapted_names(params)
    first = next(iter(params.values()))
    device = first.device
    table = lr_table(1.0 if isinstance(lrs, dict) else lrs, steps, names, device, compute_dtype(first.dtype))
    if settings.bn_mode == "frozen":  # statistics and affine stay fixed during the inner loop
        keep = torch.tensor([0.0 if ".bn." in n else 1.0 for n in names], dtype=table.dtype, device=device)
        table = table * keep
    if len(adapted) < len(names):  # the rates of the adapted parameters only
        table = table[:, torch.tensor([names.index(k) for k in adapted], device=device)]
    elementwise = _elementwise_rates(lrs, adapted, params)
    fork = torch.random.fork_rng(devices=[]) if rng is not None else contextlib.nullcontext()
    # Called under torch.no_grad() (evaluation): adapt without a graph; the inner gradients
    # themselves still need autograd, hence enable_grad below.
    if not torch.is_grad_enabled():
        settings = settings.replace(no_graph=True)

    with fork, torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False), \
            ops.use_backend(settings.backend or ops.current_backend()):
        if rng is not None:  # stochastic layers (dropout) draw from the caller's stream
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
        x = compute_inputs(x, compute_dtype(first.dtype))
        base = {k: to_compute(params[k]) for k in adapted}
        # Weights the inner loop does not adapt: every task keeps the base, and the meta-gradient
        # reaches it through the expand.
        fixed = {k: to_compute(v).expand(T, *v.shape) for k, v in params.items() if k not in base}
        stepped = task_model.with_fixed(fixed) if fixed else task_model
        skipped = torch.zeros(T, dtype=torch.bool, device=device)
        while True:
            try:
                result = _run_steps(stepped, base, x, y, query, table, skipped, settings, msl_weights, elementwise,
                                    start_state)
                return _with_fixed_weights(result, fixed, names) if fixed else result
            except _SkipTasks as skip:
                # Rerun with those tasks' inputs zeroed: their graph must hold no inf/NaN, or the
                # masked-out gradient (0 * NaN) would still poison the shared meta-gradient.
                skipped = skipped | skip.bad
                x = map_inputs(lambda t: torch.where(task_view(skipped, t), torch.zeros_like(t), t), x)


def _check_params_of(params: dict[str, Tensor], model, who: str = "params") -> None:
    """params must be the model's own: a dict of its parameters by name, each of its shape (or
    [T, *shape]), every trainable one included (frozen ones may be left out)."""
    if not isinstance(params, dict):
        raise TypeError(f"{who} must be a dict name -> tensor, dict(model.named_parameters()), got "
                        f"{type(params).__name__}")
    if not params:
        raise ValueError(f"{who} is empty; pass model.named_parameters() as a dict")
    not_tensors = [k for k, v in params.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise TypeError(f"{who} must map names to tensors; {not_tensors[:4]} are not tensors")
    own = dict(model.named_parameters())
    unknown = [k for k in params if k not in own]
    wrong = [f"{k} {list(v.shape)} (the model's is {list(own[k].shape)})" for k, v in params.items()
             if k in own and tuple(v.shape[-own[k].dim():] if own[k].dim() else v.shape[v.dim():]) != tuple(own[k].shape)]
    if unknown or wrong:
        found = f"unknown names {unknown[:4]}" if unknown else f"other shapes: {'; '.join(wrong[:3])}"
        raise ValueError(f"{who} are not {type(model).__name__}'s: {found}; pass dict(model.named_parameters()) of "
                         "the model given as model=")
    missing = [k for k, p in own.items() if k not in params and p.requires_grad]
    if missing:
        raise ValueError(f"{who} lack {missing[:6]}{' ...' if len(missing) > 6 else ''} of {type(model).__name__}: pass "
                         "every parameter, dict(model.named_parameters()); to keep some fixed in the inner loop, name "
                         "the adapted ones with adapt_params=...")


def _elementwise_rates(lrs, adapted: list[str], params: dict[str, Tensor]) -> list[Tensor] | None:
    """Meta-SGD: `lrs` as {name: rates of that parameter's shape}, per element; None otherwise."""
    if not isinstance(lrs, dict):
        return None
    missing = [k for k in adapted if k not in lrs]
    if missing:
        raise ValueError(f"per-element rates (Meta-SGD) need one rate tensor per adapted parameter; missing {missing}")
    extra = [k for k in lrs if k not in adapted]
    if extra:
        raise ValueError(f"per-element rates (Meta-SGD) name {extra[:4]}, which {'is' if len(extra) == 1 else 'are'} "
                         f"not adapted parameter(s) ({adapted[:6]}{' ...' if len(adapted) > 6 else ''}); give rates for "
                         "the adapted parameters only")
    for k in adapted:
        if lrs[k].shape != params[k].shape:
            raise ValueError(f"the rates of {k} must have its shape {list(params[k].shape)}, got {list(lrs[k].shape)}")
    rates = [lrs[k] for k in adapted]
    # Finite only: Meta-SGD learns each rate's sign as well (the update direction), so a learned
    # rate may legitimately cross zero. One host sync for all of them.
    finite = torch.stack([torch.isfinite(r.detach()).all() for r in rates])
    if not bool(finite.all()):
        k = adapted[finite.tolist().index(False)]
        check_rates(lrs[k], f"the per-element rates (Meta-SGD) of {k}", allow_negative=True)
    return rates


def _with_fixed_weights(result: AdaptResult, fixed: dict[str, Tensor], names: list[str]) -> AdaptResult:
    """The result with the weights that were not adapted ([T, *shape] views of the base) among the
    adapted ones, in the order of the model's parameters; its recompute backward takes adjoints
    for all of them."""
    adapted = result.adapted
    result.adapted = {k: adapted[k] if k in adapted else fixed[k] for k in names}
    if result.backward is not None:
        inner_backward = result.backward

        def backward(adjoint: list[Tensor]) -> None:
            by_name = dict(zip(names, adjoint))
            inner_backward([by_name[k] for k in adapted])
            pairs = [(fixed[k], by_name[k]) for k in fixed if fixed[k].requires_grad]
            if pairs:
                torch.autograd.backward([w for w, _ in pairs], [a for _, a in pairs])
        result.backward = backward
    return result


def _raise_nonfinite(bad: Tensor, loss_t: Tensor, step: int, base: dict[str, Tensor]) -> None:
    tasks = bad.nonzero().flatten().tolist()
    if step == 0:  # before any inner update: the weights or the inputs, not the inner lr
        largest = max(float(v.detach().abs().max()) for v in base.values())
        raise NonFiniteLossError(
            f"non-finite inner loss at inner step 0, before any inner update, for task(s) {tasks} (loss "
            f"{loss_t.detach()[bad].tolist()}): the model's weights (largest magnitude {largest:.3g}) or the "
            "support inputs are not fit to use; check the inputs, and the meta-update that made the "
            "weights (meta_lr), or set skip_nonfinite_tasks=True to skip such tasks")
    raise NonFiniteLossError(
        f"non-finite inner loss or gradient at inner step {step} for task(s) {tasks} (loss "
        f"{loss_t.detach()[bad].tolist()}); lower the inner lr, set inner_clip, or set "
        "skip_nonfinite_tasks=True to skip such tasks")


class _SkipTasks(Exception):
    def __init__(self, bad: Tensor):
        self.bad = bad


def _run_steps(task_model: TaskModel, base: dict[str, Tensor], x: Tensor, y: Tensor, query, table: Tensor,
               skipped: Tensor, settings: InnerLoopSettings, msl_weights: Tensor | None,
               elementwise: list[Tensor] | None = None, start_state: CarriedState | None = None) -> AdaptResult:
    T = lead_tensor(x).shape[0]
    names = list(base)
    recompute = settings.recompute
    no_graph = settings.no_graph or recompute
    starts, rng_states = [], []  # recompute: each step's starting weights (step 0: the base) and RNG state
    if no_graph:
        fast = {k: v.detach().expand(T, *v.shape).clone().requires_grad_(True) for k, v in base.items()}
    else:
        fast = {k: v.expand(T, *v.shape) for k, v in base.items()}
    optimizer = settings.optimizer
    state = optimizer.init_state(list(fast.values())) if optimizer.has_state else None
    factored = _factorable(task_model, base, settings, elementwise, state)
    if factored:
        fast = {k: FactoredWeight(v) if k in factored else v for k, v in fast.items()}
    offset = 0  # updates the state has seen before this loop
    if start_state is not None:
        shapes = [tuple(v.shape[1:]) for v in fast.values()]
        if len(start_state.state) != len(state) or any([tuple(s.shape) for s in kind] != shapes
                                                       for kind in start_state.state):
            raise ValueError("start_state does not match the adapted weights: one tensor of each weight's shape per "
                             "kind of the inner optimizer's state")
        state = [[s.to(v.dtype).expand_as(v).clone() for s, v in zip(kind, fast.values())] for kind in start_state.state]
        offset = start_state.steps
    # Meta-SGD's per-element rates: they scale an optimizer's step (its kernels take them), or
    # plain SGD's gradient.
    rates = [to_compute(a) for a in elementwise] if elementwise is not None and state is not None else None
    task_ok = ~skipped
    logs, curve_loss, curve_acc = [], [], []  # the adaptation curve, averaged over the tasks
    curve_per_task = []  # and per task: (loss [T], accuracy [T]) at each point
    msl_total = None

    def query_point(step):
        if query is None:
            return None, None
        with torch.no_grad():
            ql, qa = query_pass(task_model, _held(fast), *query, step=step, settings=settings)
        curve_per_task.append((ql, qa))
        curve_loss.append(masked_mean(ql, task_ok))
        curve_acc.append(masked_mean(qa, task_ok))
        return curve_loss[-1], curve_acc[-1]

    pick = _inner_batches(T, lead_tensor(x).shape[1], settings.inner_batch, lead_tensor(x).device)
    for step in range(settings.steps):
        q_loss, q_acc = query_point(step)
        xk, yk = (x, y) if pick is None else pick(x, y, step)
        if recompute:
            starts.append(None if step == 0 else {k: v.detach().clone() for k, v in fast.items()})
            rng_states.append(_rng_state(lead_tensor(x).device))
        if factored:  # plain SGD with factored Linear weights: its own step, then on to the next
            fast, loss_t, logs_entry = _factored_step(task_model, fast, xk, yk, settings, step, table[step], task_ok,
                                                      skipped, base, q_loss, q_acc)
            logs.append(logs_entry)
            if msl_weights is not None:
                q_t, _ = query_pass(task_model, _held(fast), *query, step=step + 1, settings=settings)
                term = msl_weights[step].to(q_t.dtype) * q_t
                msl_total = term if msl_total is None else msl_total + term
            continue
        grads, loss_t, acc_t = _task_gradients(task_model, fast, xk, yk, settings, step,
                                               create_graph=not settings.first_order and not no_graph)
        if settings.proximal:  # iMAML: the proximal term's gradient, lambda * (phi - theta), no graph
            grads = [g + settings.proximal * (f.detach() - b.detach()) for g, f, b in zip(grads, fast.values(),
                                                                                        base.values())]
        if settings.inner_clip is not None:
            norm, factor = ops.clip_grad_norm(grads, settings.inner_clip)
            _say_clipping_once(factor, norm, settings.inner_clip, step)
        else:
            with torch.no_grad():
                norm, _ = ops.clip_grad_norm([g.detach() for g in grads], math.inf)
            factor = None
        bad = ~(torch.isfinite(loss_t.detach()) & torch.isfinite(norm.detach())) & task_ok
        if bool(bad.any()):
            if settings.on_nonfinite == "raise":
                _raise_nonfinite(bad, loss_t, step, base)
            raise _SkipTasks(bad)
        if bool(skipped.any()):
            grads = _zero_skipped(grads, task_ok)
        lr_step = table[step]
        if elementwise is not None and rates is None:  # Meta-SGD: the per-element rates scale the step; lr_step is 1
            grads = [to_compute(a) * g for a, g in zip(elementwise, grads)]
        values = list(fast.values())
        if state is not None:
            with torch.no_grad() if no_graph else contextlib.nullcontext():
                grads = [g.detach() for g in grads] if no_graph else grads
                new, state = optimizer.step(values, grads, state, lr_step.detach() if no_graph else lr_step,
                                            None if factor is None else (factor.detach() if no_graph else factor),
                                            rates, offset + step, in_place=no_graph)
            fast = dict(zip(names, new))
            logs.append(_step_log(step, loss_t, acc_t, norm, factor, optimizer.directions(state, offset + step, rates),
                                  lr_step, task_ok, q_loss, q_acc, directions_scaled=True))
        else:
            logs.append(_step_log(step, loss_t, acc_t, norm, factor, grads, lr_step, task_ok, q_loss, q_acc))
            if no_graph:
                with torch.no_grad():
                    ops.sgd_step_(values, [g.detach() for g in grads], lr_step.detach(),
                                  None if factor is None else factor.detach())
            else:
                fast = dict(zip(names, ops.sgd_step(values, grads, lr_step, factor)))
        if msl_weights is not None:  # multi-step loss: the query loss after this update, with its graph
            q_t, _ = query_pass(task_model, fast, *query, step=step + 1, settings=settings)
            term = msl_weights[step].to(q_t.dtype) * q_t
            msl_total = term if msl_total is None else msl_total + term
    query_point(settings.steps)
    if no_graph:
        fast = {k: v.detach() for k, v in fast.items()}
    fast = _held(fast)  # factored weights as placeholders: the query pass runs them factored, any other use forms them

    def backward(adjoint: list[Tensor]) -> None:
        _backward_by_recompute(task_model, base, x, y, table, task_ok, starts, rng_states, adjoint, settings,
                               elementwise)
    per_task = [torch.stack(v, 1) for v in zip(*curve_per_task)] if query is not None else [None, None]
    return AdaptResult(fast, logs, curve_loss, curve_acc, task_ok, msl_total, backward if recompute else None,
                       *per_task, optimizer_state=state)


# Plain SGD steps hold wide Linear weights in factored form (meta/factored.py); False (or
# META_KERNELS_FACTORED=0): every weight as a [T, *shape] tensor (the A/B and the tests' reference).
FACTORED = os.environ.get("META_KERNELS_FACTORED", "1") != "0"


def _factorable(task_model: TaskModel, base: dict[str, Tensor], settings: InnerLoopSettings, elementwise, state) -> set:
    """Names of the adapted Linear weights to step in factored form: those the task-batching
    engine runs as one batched product, wide enough (rank limit >= 32, as in the compat layer).
    None where the loop needs each weight's gradient whole or as a tensor: an inner optimizer with
    state, Meta-SGD's rates, iMAML's proximal term, no graph (Reptile, evaluation) or recompute,
    torch.func or a compiled forward."""
    if (not FACTORED or state is not None or elementwise is not None or settings.proximal or settings.no_graph
            or settings.recompute or settings.engine != "custom" or task_model.mode != "batched"
            or task_model.compiled is not None):
        return set()
    batched = {id(original) for view, original in task_model.engine._pairs if isinstance(view, _TaskLinear)}
    modules = dict(task_model.model.named_modules())
    names = set()
    for name, w in base.items():
        path, _, leaf = name.rpartition(".")
        module = modules.get(path)
        if (leaf == "weight" and module is not None and id(module) in batched and w.dim() == 2
                and w.is_floating_point() and factored_rank_limit(*w.shape) >= 32):
            names.add(name)
    return names


def _held(fast: dict, records: list | None = None) -> dict[str, Tensor]:
    """The weights as a forward takes them: factored ones as placeholders, recording their
    factored forwards into `records` (None: not recorded)."""
    return {k: placeholder(i, w, records) if isinstance(w, FactoredWeight) else w for i, (k, w) in enumerate(fast.items())}


def _factored_step(task_model: TaskModel, fast: dict, x, y, settings: InnerLoopSettings, step: int, lr_step: Tensor,
                   task_ok: Tensor, skipped: Tensor, base: dict[str, Tensor], q_loss, q_acc):
    """One plain SGD step with factored Linear weights (FactoredWeight in `fast`): the inner
    gradient w.r.t. their layers' outputs, each task's gradient norm from the factors
    (||gᵀ x||² = <g gᵀ, x xᵀ>; the clip factor from it), the step as new factors. The rest as
    the dense loop does it.
    Returns (new fast, per-task loss, the step's log)."""
    create_graph = not settings.first_order
    records: list = []
    out = task_model(_held(fast, records), x, double_backward=create_graph, step=step, bn_mode=settings.bn_mode)
    loss_t, acc_t = per_task_loss(out, y, settings.loss)
    entries = list(fast.values())
    direct, outer = entry_grads(entries, range(len(entries)), records, loss_t.sum(), create_graph)
    # With clipping the norms are part of the step (differentiable); else only the log's and the check's.
    clip = settings.inner_clip
    tracked = contextlib.nullcontext() if clip is not None else torch.no_grad()
    dense, factors, sq = {}, {}, []  # dense gradients, (g, x) per factored weight, squared norms [T] per weight
    for i, w in enumerate(entries):
        pairs = outer.get(i)
        if pairs:  # the factored forwards' (input, output gradient): g [T, r, out], x [T, r, in]
            g, xs = torch.cat([g for _, g in pairs], 1), torch.cat([xi for xi, _ in pairs], 1)
        if isinstance(w, FactoredWeight) and w.dense_ is None:
            if not pairs:  # not used by this forward: no step
                sq.append(torch.zeros(w.base.shape[0], dtype=w.base.dtype, device=w.base.device))
                continue
            factors[i] = (g, xs)
            with tracked:
                sq.append((torch.bmm(g, g.transpose(1, 2)) * torch.bmm(xs, xs.transpose(1, 2))).sum((1, 2)))
            continue
        # A tensor, or a factored weight that another use formed: its whole gradient.
        d = direct.get(i)
        like = w.dense_ if isinstance(w, FactoredWeight) else w
        d = torch.zeros_like(like) if d is None else d
        if pairs:
            d = d + torch.bmm(g.transpose(1, 2), xs)
        dense[i] = d
        with tracked:
            sq.append(d.square().sum(tuple(range(1, d.dim()))) if clip is not None else _task_norms(d.detach()).square())
    sq = torch.stack([v.to(torch.float64 if v.dtype == torch.float64 else torch.float32) for v in sq])  # [n, T]
    norm = sq.sum(0).sqrt()
    factor = None
    if clip is not None:  # ops.clip_grad_norm's factor, from these norms
        factor = reference.clip_factor(norm, clip, 1e-6)
        _say_clipping_once(factor, norm, clip, step)
    bad = ~(torch.isfinite(loss_t.detach()) & torch.isfinite(norm.detach())) & task_ok
    if bool(bad.any()):
        if settings.on_nonfinite == "raise":
            _raise_nonfinite(bad, loss_t, step, base)
        raise _SkipTasks(bad)
    new = list(entries)
    if dense:
        moved = list(dense)
        grads = [dense[i] for i in moved]
        if bool(skipped.any()):
            grads = _zero_skipped(grads, task_ok)
        values = [entries[i].dense_ if isinstance(entries[i], FactoredWeight) else entries[i] for i in moved]
        rates = lr_step[torch.tensor(moved, device=lr_step.device)]
        for i, v in zip(moved, ops.sgd_step(values, grads, rates, factor)):
            new[i] = FactoredWeight(v) if isinstance(entries[i], FactoredWeight) else v
    for i, (g, xs) in factors.items():
        g = g * lr_step[i].to(g.dtype)
        if factor is not None:
            g = g * factor.to(g.dtype).view(-1, 1, 1)
        if bool(skipped.any()):
            g = g * task_ok.to(g.dtype).view(-1, 1, 1)
        new[i] = entries[i].stepped(g, xs)
    log = _step_log(step, loss_t, acc_t, norm, factor, None, lr_step, task_ok, q_loss, q_acc, squares=sq.detach())
    return dict(zip(fast, new)), loss_t, log


def _inner_batches(T: int, samples: int, batch: int, device):
    """settings.inner_batch: (x, y, step) -> the step's `batch` examples of each task, taken in the
    task's own random order and cycling; None when every step takes all `samples`."""
    if not 0 < batch < samples:
        return None
    order = torch.rand(T, samples, device=device).argsort(1)
    rows, within = torch.arange(T, device=device).unsqueeze(1), torch.arange(batch, device=device)

    def pick(x, y: Tensor, step: int):
        at = order[:, (step * batch + within) % samples]
        return map_inputs(lambda t: t[rows, at], x), y[rows, at]
    return pick


_CLIP_SAID = False


def _say_clipping_once(factor: Tensor, norm: Tensor, clip: float, step: int) -> None:
    """A one-time notice the first time inner_clip changes an update: the peers and the papers do
    not clip, and MAMLConfig clips at norm 10 by default."""
    global _CLIP_SAID
    if _CLIP_SAID or not bool((factor.detach() < 1).any()):
        return
    _CLIP_SAID = True
    warnings.warn(f"meta_kernels: inner_clip={clip} scaled down an inner update (inner step {step}: gradient norm "
                  f"{float(norm.detach().max()):.3g} > {clip}). MAMLConfig clips each task's inner gradient at norm 10 "
                  "by default as a guard; the peers and the papers do not clip: set inner_clip=None to match them "
                  "(said once)", stacklevel=4)


def _zero_skipped(grads: list[Tensor], task_ok: Tensor) -> list[Tensor]:
    """Zero gradients for skipped tasks: they stay at the base weights."""
    return [torch.where(task_view(task_ok, g), g, torch.zeros_like(g)) for g in grads]


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _backward_by_recompute(task_model, base, x, y, table, task_ok, starts, rng_states, adjoint,
                           settings: InnerLoopSettings, elementwise: list[Tensor] | None = None) -> None:
    """Back-propagates `adjoint` (d objective / d weights after the last step) through the inner
    loop, last step first: each step's second-order graph is rebuilt from its starting weights
    (with the RNG state it ran with), used for one vector-Jacobian product and freed. Gradients
    reach the base weights (through step 0) and the learning-rate table, as backward through the
    whole graph would."""
    device = lead_tensor(x).device
    T, steps = lead_tensor(x).shape[0], len(starts)
    lr_leaf = table.detach().requires_grad_(table.requires_grad)
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with fork, torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
        for step in reversed(range(steps)):
            _set_rng_state(device, rng_states[step])
            if step == 0:
                theta = {k: v.expand(T, *v.shape) for k, v in base.items()}
            else:
                theta = {k: v.requires_grad_(True) for k, v in starts[step].items()}
                starts[step] = None  # freed once used
            grads, _, _ = _task_gradients(task_model, theta, x, y, settings, step, create_graph=True)
            factor = ops.clip_grad_norm(grads, settings.inner_clip)[1] if settings.inner_clip is not None else None
            if not bool(task_ok.all()):  # as in the forward pass
                grads = _zero_skipped(grads, task_ok)
            if elementwise is not None:
                grads = [to_compute(a) * g for a, g in zip(elementwise, grads)]
            new = ops.sgd_step(list(theta.values()), grads, lr_leaf[step], factor)
            # Step 0 reaches the base weights (leaves of the caller's graph); later steps stop at
            # their starting weights, whose gradient is the next adjoint.
            wanted = None if step == 0 else list(theta.values()) + ([lr_leaf] if lr_leaf.requires_grad else []) + \
                [a for a in elementwise or [] if a.requires_grad]
            torch.autograd.backward(new, adjoint, inputs=wanted)
            if step > 0:
                adjoint = [v.grad for v in theta.values()]
            del theta, grads, factor, new
    if lr_leaf.grad is not None:
        torch.autograd.backward(table, lr_leaf.grad)


def _task_gradients(task_model: TaskModel, fast: dict[str, Tensor], x: Tensor, y: Tensor,
                    settings: InnerLoopSettings, step: int, create_graph: bool):
    """Per-task gradients [T, *shape] of each task's support loss, plus per-task loss and accuracy."""
    bn_mode, loss = settings.bn_mode, settings.loss
    if settings.engine == "torch_func":
        def total(f):
            loss_t, acc_t = per_task_loss(task_model.forward(f, x, step, bn_mode), y, loss)
            return loss_t.sum(), (loss_t, acc_t)
        # torch.func transforms cannot see through register_autograd ops: the forward inside the
        # transform runs the reference ops; the update outside still uses the fused kernels.
        with ops.use_backend("reference"):
            grads, (loss_t, acc_t) = torch.func.grad(total, has_aux=True)(fast)
        grads = [grads[k] if create_graph else grads[k].detach() for k in fast]
        return grads, loss_t, acc_t
    loss_t, acc_t = per_task_loss(task_model(fast, x, double_backward=create_graph, step=step, bn_mode=bn_mode), y, loss)
    # A weight the forward does not use gets a zero inner gradient (it stays as it is; the model may
    # hold parameters it uses only in some configurations).
    grads = torch.autograd.grad(loss_t.sum(), list(fast.values()), create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return list(grads), loss_t, acc_t


def _task_norms(d: Tensor) -> Tensor:
    """The L2 norm of each task's slice of d [T, ...], in float32 at least."""
    d = d if d.dtype == torch.float64 else d.float()
    return d.abs() if d.dim() == 1 else torch.linalg.vector_norm(d, dim=tuple(range(1, d.dim())))


def _step_log(step, loss_t, acc_t, norm, factor, directions, lr_step, task_ok, q_loss, q_acc,
              directions_scaled: bool = False, squares: Tensor | None = None) -> StepLog:
    """directions: the gradients (SGD), or the optimizer's steps, which hold the clip factor
    already (directions_scaled); or `squares`, their squared norms per task [n, T]."""
    with torch.no_grad():
        lr = lr_step.detach().float()
        # ||update|| per task = sqrt(sum_i (lr_i * factor_t)^2 ||d_i,t||^2)
        # One read of each direction (a weight gradient of a bmm is strided: reshape would copy it).
        sq = squares.float() if squares is not None else torch.stack([_task_norms(d.detach()).square()
                                                                      for d in directions])  # [n, T]
        upd = (lr.pow(2).unsqueeze(1) * sq).sum(0).sqrt()
        if factor is not None and not directions_scaled:
            upd = upd * factor.detach().float()
        return StepLog(step=step, loss=masked_mean(loss_t.detach(), task_ok), accuracy=masked_mean(acc_t, task_ok),
                       grad_norm=masked_mean(norm.detach().float(), task_ok), update_norm=masked_mean(upd, task_ok),
                       lr_mean=float(lr.mean()), lr_min=float(lr.min()), lr_max=float(lr.max()),
                       clip_factor=1.0 if factor is None else masked_mean(factor.detach().float(), task_ok),
                       loss_per_task=loss_t.detach().tolist(), query_loss=q_loss, query_accuracy=q_acc)
