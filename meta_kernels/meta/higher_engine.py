"""The `higher` inner-loop engine (optional extra: pip install higher). higher patches a module
per task, so tasks run one after another; it exists to cross-check meta-gradients against the
library many users know, not for speed."""
from __future__ import annotations

import torch

from meta_kernels.meta.inner_common import (AdaptResult, InnerLoopSettings, StepLog, as_task_batch, compute_inputs, lr_table,
                                            per_task_loss)


def adapt_with_higher(params, support_batch, *, task_model, settings: InnerLoopSettings, lrs,
                      query_batch) -> AdaptResult:
    try:
        import higher
    except ImportError as exc:
        raise ImportError("engine='higher' needs the optional package higher: pip install higher") from exc
    if settings.optimizer.has_state:
        raise ValueError(f"engine='higher' runs plain SGD inside; inner_optimizer={settings.optimizer.name!r} runs on "
                         "engine='custom' (or 'auto')")
    if settings.inner_clip is not None:
        raise ValueError("engine='higher' does not clip inner gradients; set inner_clip=None or use engine='custom'")
    if query_batch is not None:
        raise ValueError("engine='higher' does not track the adaptation curve; use engine='custom' for it")
    steps, no_graph = settings.steps, settings.no_graph
    model = task_model.model
    names = list(params)
    if any(p is not q for p, q in zip(params.values(), dict(model.named_parameters()).values())):
        raise ValueError("engine='higher' adapts the model's own parameters: pass dict(model.named_parameters())")
    x, y = as_task_batch(*support_batch, "support", settings.loss)
    x = compute_inputs(x, next(iter(params.values())).dtype)  # half inputs meet the module's own weights
    table = lr_table(lrs, steps, names, x.device, next(iter(params.values())).dtype)
    adapted = {k: [] for k in names}
    logs = []
    for t in range(x.shape[0]):
        # One SGD param group per tensor so each gets its own (possibly per-step) rate.
        opt = torch.optim.SGD([{"params": [p], "lr": 1.0} for p in params.values()], lr=1.0)
        # First order: keep the identity path to the base weights, detach the inner gradients.
        detach = (lambda grads: [g.detach() for g in grads]) if settings.first_order else None
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                  track_higher_grads=not no_graph) as (fmodel, diffopt):
            for step in range(steps):
                out = fmodel(x[t])
                task_loss, acc = per_task_loss(out.unsqueeze(0), y[t:t + 1], settings.loss)
                diffopt.step(task_loss.sum(), override={"lr": [table[step, i] for i in range(len(names))]},
                             grad_callback=detach)
                if t == 0:
                    logs.append(StepLog(step, float(task_loss.detach()), float(acc), float("nan"), float("nan"),
                                        float(table[step].mean()), float(table[step].min()), float(table[step].max())))
            for k, p in zip(names, fmodel.parameters()):
                adapted[k].append(p.detach() if no_graph else p)
    fast = {k: torch.stack(v) for k, v in adapted.items()}
    return AdaptResult(fast, logs, [], [], torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
