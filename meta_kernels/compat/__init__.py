"""Drop-in replacements for the two libraries most meta-learning scripts are written against:

    from meta_kernels.compat import learn2learn as l2l   # was: import learn2learn as l2l
    from meta_kernels.compat import higher               # was: import higher

Both keep their library's documented behaviour and run the inner updates on our fused ops;
`l2l.algorithms.MAML(...).clone(tasks=T)` adapts T tasks at once on the task-batching engine, with
`task_sum(loss_fn)` as its loss. README, "Coming from learn2learn / higher", lists what is not supported."""
from meta_kernels.compat import higher, learn2learn
from meta_kernels.compat._common import task_sum

__all__ = ["higher", "learn2learn", "task_sum"]
