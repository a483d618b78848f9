"""The outputs and losses of the batched compat forms (`MAML(..., tasks=T)`, `clone(tasks=T)`,
`innerloop_ctx(..., tasks=T)`).

Inputs hold two leading dims, tasks and samples, in either order: [T, N, ...] (task_dim=0, as a
task-batched loader gives them) or [N, T, ...] (task_dim=1, so per-task code that splits a task's
samples along dim 0 runs unchanged). Outputs come back as TaskOutputs, laid out as PyTorch's
K-dimensional loss inputs: [T, C, N] (task_dim 0) or [N, C, T] (task_dim 1) for a model that
gives [N, C] per task (generally the model's output dims between the two). So a script's own
helpers keep working: `out.argmax(dim=1)` is each sample's class, shaped like the targets
([T, N] or [N, T]), and counting correct predictions counts them over every task.

The loss: every torch loss function given a TaskOutputs (F.cross_entropy, nn.CrossEntropyLoss(),
F.mse_loss, ...) returns the sum over tasks of that loss on each task alone (its [N, C] outputs
and [N, ...] targets) -- what a per-task loop adds up, so `adapt` gives each task its own step and
the meta-gradient is the loop's sum. `task_sum(loss_fn)` does the same for any other loss
function. Such a sum carries a mark that `adapt` / `diffopt.step` check: a loss computed
otherwise (a hand-written mean over all outputs, which would divide every task's step by T)
is refused with a message naming task_sum. Any other operation on a TaskOutputs gives a plain
tensor."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor

_MARK = "_meta_kernels_task_sum"

# torch's loss functions that take (input, target, ...): given a TaskOutputs, each is summed over tasks.
_LOSSES = {F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
           F.binary_cross_entropy_with_logits, F.kl_div, F.soft_margin_loss, F.multilabel_soft_margin_loss,
           F.multi_margin_loss, F.multilabel_margin_loss, F.poisson_nll_loss, F.gaussian_nll_loss}


class TaskOutputs(Tensor):
    """A batched learner's output in the K-dimensional loss layout (see the module docstring);
    `per_task` holds the same values as [T, N, ...], `task_dim` the dim of the tasks in the
    inputs and targets."""
    per_task: Tensor
    task_dim: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOSSES:
            return _summed_over_tasks(func, args, kwargs, name=func.__name__)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @property
    def tasks(self) -> int:
        return self.per_task.shape[0]


def task_outputs(per_task, task_dim: int):
    """Every tensor of a model's (nested) output, [T, N, *out], as a TaskOutputs."""
    def wrap(t):
        if not isinstance(t, Tensor):
            return t
        layout = t.movedim(1, -1) if task_dim == 0 else t.movedim(0, -1)
        out = layout.as_subclass(TaskOutputs)
        out.per_task, out.task_dim = t, task_dim
        return out
    return pytree.tree_map(wrap, per_task)


def inputs_tasks_first(inputs, task_dim: int, tasks: int, who: str):
    """The inputs' tensors as [T, N, ...], checked to hold `tasks` tasks in `task_dim`."""
    def move(t):
        if not isinstance(t, Tensor):
            return t
        if t.dim() < 2 or t.shape[task_dim] != tasks:
            layout = "[T, N, ...]" if task_dim == 0 else "[N, T, ...]"
            raise ValueError(f"{who} adapts {tasks} tasks at once with the tasks in dim {task_dim} ({layout}), but an "
                             f"input has shape {list(t.shape)}; pass inputs as "
                             f"{layout.replace('T', str(tasks))} (or build it with tasks={t.shape[task_dim] if t.dim() > task_dim else '...'})")
        return t if task_dim == 0 else t.movedim(1, 0)
    return pytree.tree_map(move, inputs)


def _target_of_task(target, t: int, task_dim: int, tasks: int, name: str):
    if isinstance(target, TaskOutputs):
        return target.per_task[t]
    if not isinstance(target, Tensor):
        return target
    if target.dim() <= task_dim or target.shape[task_dim] != tasks:
        raise ValueError(f"{name}: the outputs hold {tasks} tasks, but the target has shape {list(target.shape)}; "
                         f"give targets with the tasks in dim {task_dim}, as the inputs")
    return target.select(task_dim, t)


def _summed_over_tasks(loss_fn: Callable, args: tuple, kwargs: dict, name: str):
    """loss_fn on each task's outputs and targets alone, summed over tasks and marked (or, with
    reduction='none', the per-task results stacked in the targets' layout)."""
    args = list(args)
    if args:
        outputs = args.pop(0)
    else:
        outputs = kwargs.pop("input")
    if not isinstance(outputs, TaskOutputs):
        raise TypeError(f"{name}: the outputs are a plain tensor of shape {list(outputs.shape)}, not a batched learner's; "
                        "task_sum sums a loss over the tasks of MAML(..., tasks=T) / clone(tasks=T) / "
                        "innerloop_ctx(..., tasks=T) outputs. For a single task, call the loss function itself")
    T, task_dim = outputs.tasks, outputs.task_dim
    target_key = None if args else next((k for k in ("target", "targets", "y") if k in kwargs), None)
    losses = []
    for t in range(T):
        a = list(args)
        kw = dict(kwargs)
        if a:
            a[0] = _target_of_task(a[0], t, task_dim, T, name)
        elif target_key is not None:
            kw[target_key] = _target_of_task(kw[target_key], t, task_dim, T, name)
        losses.append(loss_fn(outputs.per_task[t], *a, **kw))
    if any(not isinstance(v, Tensor) for v in losses):
        raise TypeError(f"{name} returned {type(next(v for v in losses if not isinstance(v, Tensor))).__name__} for a "
                        "task, not a tensor: a loss must be a tensor that depends on the outputs")
    if all(v.dim() == 0 for v in losses):
        total = torch.stack(losses).sum()
        setattr(total, _MARK, T)
        return total
    return torch.stack(losses, dim=task_dim)  # reduction='none': per task, in the targets' layout


def task_sum(loss_fn: Callable) -> Callable:
    """loss_fn made task-batched: on a batched learner's outputs it returns the sum over tasks of
    loss_fn(task's outputs [N, ...], task's targets [N, ...]), marked for adapt. torch's own loss
    functions do this by themselves on a TaskOutputs; task_sum is for any other loss function."""
    if not callable(loss_fn):
        raise TypeError(f"task_sum takes a loss function, got {type(loss_fn).__name__}")
    name = f"task_sum({getattr(loss_fn, '__name__', type(loss_fn).__name__)})"

    def summed(outputs, *args, **kwargs):
        return _summed_over_tasks(loss_fn, (outputs, *args), kwargs, name)
    return summed


def checked_task_loss(loss, tasks: int, who: str) -> Tensor:
    """The scalar to differentiate for a batched step: a task-summed loss (marked), or a [T]
    vector of per-task losses (summed here). Anything else is refused: a mean over every task's
    outputs would silently divide each task's step by T."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{who} takes a loss tensor, got {type(loss).__name__}")
    if loss.dim() == 1 and loss.numel() == tasks:
        return loss.sum()
    if loss.dim() == 0 and getattr(loss, _MARK, None) == tasks:
        return loss
    if loss.dim() == 0:
        raise ValueError(f"{who}: this loss is not a sum over the {tasks} tasks (a torch loss function or "
                         "meta_kernels.compat.task_sum(loss_fn) applied to the learner's outputs gives one); a loss "
                         "computed otherwise, e.g. a mean over every task's outputs, would divide each task's step by "
                         f"{tasks}. Use task_sum(your_loss_fn)(outputs, targets), or pass the [T] vector of per-task "
                         "losses")
    raise ValueError(f"{who} takes the sum of the {tasks} per-task losses (a scalar) or their [T] vector, got a loss of "
                     f"shape {list(loss.shape)}; meta_kernels.compat.task_sum(loss_fn) gives the sum")
