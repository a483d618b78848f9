"""learn2learn 0.2's MAML and MetaSGD, for scripts that import

    from meta_kernels.compat import learn2learn as l2l

instead of `import learn2learn as l2l`: `l2l.algorithms.MAML(model, lr)`, `learner = maml.clone()`,
`learner.adapt(loss)` behave as documented by learn2learn, and each update runs as one fused
`sgd_step` launch for all of the model's weights. `maml.clone(tasks=T)` is the batched form: one
learner for T tasks at once on the task-batching engine (see algorithms.BatchedLearner)."""
from meta_kernels.compat.learn2learn import algorithms
from meta_kernels.compat.learn2learn.algorithms import clone_module

__all__ = ["algorithms", "clone_module"]
