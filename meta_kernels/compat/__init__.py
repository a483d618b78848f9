"""Drop-in replacements for the two libraries most meta-learning scripts are written against:

    from meta_kernels.compat import learn2learn as l2l   # was: import learn2learn as l2l
    from meta_kernels.compat import higher               # was: import higher

Both keep their library's documented behaviour, faster (a learner is a list of weights run
through the model's own modules, or the fused ops, or -- for a MAML learner's wide Linear
weights -- in factored form, whichever measured faster for the model; one multi-tensor call per
update). The batched forms (`MAML(..., tasks=T)`, `innerloop_ctx(...,
tasks=T)`) adapt T tasks at once on the task-batching engine; torch's loss functions on their
outputs sum over tasks, `task_sum(loss_fn)` does it for any other. README, "Coming from
learn2learn / higher", lists what is not supported."""
from torch import nn

from meta_kernels.compat import higher, learn2learn
from meta_kernels.compat._common import runner_for
from meta_kernels.compat._tasks import TaskOutputs, task_sum


def runner_plan(model: nn.Module) -> str:
    """How the import-swapped learners run `model` per task and why: the path and thread count
    measured on its first differentiated call, with the times (see README, "Why it is faster")."""
    return runner_for(model).plan


__all__ = ["TaskOutputs", "higher", "learn2learn", "runner_plan", "task_sum"]
