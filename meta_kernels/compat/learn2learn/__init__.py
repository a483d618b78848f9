"""learn2learn 0.2's MAML and MetaSGD and the helpers scripts call, for scripts that import

    from meta_kernels.compat import learn2learn as l2l

instead of `import learn2learn as l2l`: `l2l.algorithms.MAML(model, lr)`, `learner = maml.clone()`,
`learner.adapt(loss)` behave as documented by learn2learn, faster (see algorithms). `l2l.utils`
(clone_module, update_module, detach_module, clone_parameters) and `l2l.nn` (Lambda, Flatten,
Scale) are there too. The batched form: `MAML(model, lr, tasks=T, task_dim=1)` with
`l2l.data.stack_tasks(tasksets, T, dim=1)` adapts T tasks at once (README, "The batched form")."""
from meta_kernels.compat.learn2learn import algorithms, data, nn, utils
from meta_kernels.compat.learn2learn.utils import clone_module, clone_parameters, detach_module, update_module

__all__ = ["algorithms", "clone_module", "clone_parameters", "data", "detach_module", "nn", "update_module", "utils"]
