"""meta_kernels: gradient-based meta-learning (MAML, FOMAML, Reptile) on fused inner-loop kernels.

Ops:   sgd_step, sgd_step_, momentum_step(_), adam_step(_), clip_grad_norm, batch_norm, max_pool2x2_relu, conv3x3_bn_pool_relu, reptile_update_
       (backend per call,
       per use_backend(...) block, or $META_KERNELS_BACKEND; backend_info() tells what runs).
Meta:  adapt, meta_loss, meta_backward, MetaLearner, MAML (learn2learn-style wrapper), Conv4; any
       nn.Module runs its tasks batched (explain(model) says how each layer runs).
CPU:   keep_freed_cpu_memory() lets glibc reuse the memory of large tensors (a faster CPU step).
"""
import sys as _sys

if _sys.argv and _sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] == "meta-kernels":  # the command line
    from meta_kernels import _startup  # first thing: a Ctrl-C while the imports run is kept (see there)
    _startup.catch_interrupts()

from meta_kernels.config import EpisodeConfig, MAMLConfig
from meta_kernels.malloc_tuning import keep_freed_cpu_memory
from meta_kernels.meta import (MAML, DetachedGraphError, InnerOptimizer, MetaLearner, NonFiniteLossError, StepLog, TaskModel, adapt,
                               check_adapted_graph, explain, meta_backward, meta_loss, params_without_meta_grad)
from meta_kernels.models import Conv4
from meta_kernels.ops import (BACKENDS, adam_step, adam_step_, backend_info, batch_norm, clip_grad_norm, conv3x3_bn_pool_relu, current_backend,
                              max_pool2x2_relu, momentum_step, momentum_step_, reptile_update_, sgd_step, sgd_step_,
                              use_backend)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "MAML", "adam_step", "adam_step_", "Conv4", "DetachedGraphError", "EpisodeConfig", "InnerOptimizer", "MAMLConfig", "MetaLearner",
           "NonFiniteLossError", "StepLog", "TaskModel", "adapt", "backend_info", "batch_norm", "check_adapted_graph",
           "clip_grad_norm", "conv3x3_bn_pool_relu", "current_backend", "explain", "keep_freed_cpu_memory", "max_pool2x2_relu", "meta_backward", "meta_loss",
           "momentum_step", "momentum_step_", "params_without_meta_grad", "reptile_update_", "sgd_step", "sgd_step_", "use_backend"]
