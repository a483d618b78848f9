"""The meta-learning layer: inner loop, MAML / FOMAML / Reptile, learners, diagnostics."""
from meta_kernels.meta.algorithms import (
                                           MetaLearner,
                                           MetaLogs,
                                           MetaOutput,
                                           meta_backward,
                                           meta_loss,
)
from meta_kernels.meta.batching import BatchedModel
from meta_kernels.meta.diagnostics import (
                                           DetachedGraphError,
                                           check_adapted_graph,
                                           meta_grad_norms,
                                           params_without_meta_grad,
)
from meta_kernels.meta.inner import adapt, adapt_tasks
from meta_kernels.meta.inner_common import (
                                           AdaptResult,
                                           InnerLoopSettings,
                                           InnerOptimizer,
                                           NonFiniteLossError,
                                           StepLog,
)
from meta_kernels.meta.learner import Learner, TaskScores, auac
from meta_kernels.meta.maml_wrapper import MAML
from meta_kernels.meta.sharded import ShardedMetaLearner
from meta_kernels.meta.task_model import TaskModel, explain

__all__ = ["MAML", "AdaptResult", "BatchedModel", "explain", "DetachedGraphError", "InnerLoopSettings", "InnerOptimizer", "Learner", "MetaLearner", "MetaLogs",
           "MetaOutput", "NonFiniteLossError", "ShardedMetaLearner", "StepLog", "TaskModel", "TaskScores", "adapt",
           "adapt_tasks", "auac", "check_adapted_graph", "meta_grad_norms", "meta_backward", "meta_loss",
           "params_without_meta_grad"]
