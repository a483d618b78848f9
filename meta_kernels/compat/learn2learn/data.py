"""Task batches for the batched form: `stack_tasks(tasksets, T, dim=1)` makes every .sample() of
learn2learn-style task datasets return T tasks at once."""
from __future__ import annotations

import torch
from torch import Tensor


class StackedTasks:
    """A task source whose sample() stacks `tasks` samples of `source` along `dim`: tensors of
    one task's shape [N, ...] become [T, N, ...] (dim 0) or [N, T, ...] (dim 1)."""

    def __init__(self, source, tasks: int, dim: int = 1):
        if not callable(getattr(source, "sample", None)):
            raise TypeError(f"stack_tasks takes task datasets with a sample() method (or a tuple of them), got "
                            f"{type(source).__name__}")
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
            raise ValueError(f"tasks must be a positive int (tasks per sample), got {tasks!r}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 ([T, N, ...]) or 1 ([N, T, ...]), got {dim!r}")
        self.source, self.tasks, self.dim = source, tasks, dim

    def sample(self, *args, **kwargs):
        samples = [self.source.sample(*args, **kwargs) for _ in range(self.tasks)]
        first = samples[0]
        if isinstance(first, Tensor):
            return _stack(samples, self.dim)
        return type(first)(_stack([s[i] for s in samples], self.dim) for i in range(len(first)))


def _stack(parts: list, dim: int):
    first = parts[0]
    if not isinstance(first, Tensor):
        first = torch.as_tensor(first)
        parts = [torch.as_tensor(p) for p in parts]
    if any(p.shape != first.shape for p in parts):
        raise ValueError(f"stack_tasks: the sampled tasks differ in shape ({sorted({tuple(p.shape) for p in parts})}); "
                         "tasks stacked together need the same number of samples")
    return torch.stack(parts, dim=min(dim, first.dim()))


def stack_tasks(tasksets, tasks: int, dim: int = 1):
    """`tasksets` (an object with sample(), or a tuple / namedtuple of them, such as learn2learn's
    BenchmarkTasksets with .train / .validation / .test) whose sample() returns `tasks` tasks
    stacked along `dim`. dim=1 keeps each task's samples in dim 0, so per-task code that splits a
    task's samples by index (learn2learn's fast_adapt) runs unchanged on the batch; pair it with
    MAML(..., tasks=T, task_dim=1)."""
    if isinstance(tasksets, tuple):
        stacked = [stack_tasks(t, tasks, dim) for t in tasksets]
        return type(tasksets)(*stacked) if hasattr(tasksets, "_fields") else type(tasksets)(stacked)
    return StackedTasks(tasksets, tasks, dim)


__all__ = ["StackedTasks", "stack_tasks"]
