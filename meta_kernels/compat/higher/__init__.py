"""higher's `innerloop_ctx`, `monkeypatch` and differentiable optimizers, for scripts that import

    from meta_kernels.compat import higher

instead of `import higher`:

    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(loss_fn(fmodel(x_support), y_support))
        loss_fn(fmodel(x_query), y_query).backward()

As in higher 0.2 (see patch.FunctionalModule and optim.DifferentiableOptimizer):
`copy_initial_weights=True` starts from detached copies of the weights (the meta-gradient does not
reach the model), `False` from differentiable clones (MAML); fmodel's buffers are copies, so the
model's BatchNorm statistics do not change; `track_higher_grads=False` is the first-order test
mode. Faster than higher: fmodel is the model's own modules run with the fast weights swapped in
(no patched copy of the tree per task), or the fused ops where that measured faster for the model,
and each update's last operation is one multi-tensor call.

tasks=T (ours): the batched form, T tasks at once on the task-batching engine, inputs holding the
tasks in dim `task_dim` (0: [T, N, ...]); fmodel's outputs are TaskOutputs ([T, C, N] for task_dim
0), so F.cross_entropy(fmodel(x), y) is the sum over tasks of each task's loss and
`argmax(dim=1)` each sample's class; each task keeps its own momentum or Adam moments."""
from contextlib import contextmanager

import torch
from torch import nn

from meta_kernels.compat.higher import optim, patch
from meta_kernels.compat.higher.optim import create_diff_optim, get_diff_optim
from meta_kernels.compat.higher.patch import monkeypatch


@contextmanager
def innerloop_ctx(model: nn.Module, opt: torch.optim.Optimizer, device=None, copy_initial_weights: bool = True,
                  override: dict | None = None, track_higher_grads: bool = True, *, tasks: int | None = None,
                  task_dim: int = 0, allow_nonfinite: bool = False):
    """Yields (fmodel, diffopt): the model with fast weights and the differentiable optimizer.
    Ours: tasks / task_dim (the batched form, see above); a NaN / inf inner loss raises
    NonFiniteLossError naming the step unless allow_nonfinite=True (higher's NaN weights)."""
    fmodel = monkeypatch(model, device, copy_initial_weights=copy_initial_weights,
                         track_higher_grads=track_higher_grads, tasks=tasks, task_dim=task_dim)
    yield fmodel, get_diff_optim(opt, model.parameters(), fmodel=fmodel, device=device, override=override,
                                 track_higher_grads=track_higher_grads, allow_nonfinite=allow_nonfinite)


def task_chunks(tasks: int, size: int):
    """slice(0, size), slice(size, 2 * size), ...: the batched form `size` tasks at a time (ours),
    `for i in task_chunks(task_num, 8):` with `innerloop_ctx(..., tasks=8)`; each chunk's graph is
    freed by its backward before the next, so memory is that of `size` tasks."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or tasks % size:
        raise ValueError(f"task_chunks: size must be a positive int dividing the {tasks} tasks, got {size!r}")
    return [slice(start, start + size) for start in range(0, tasks, size)]


__all__ = ["create_diff_optim", "get_diff_optim", "innerloop_ctx", "monkeypatch", "optim", "patch", "task_chunks"]
