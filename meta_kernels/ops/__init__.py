"""The fused inner-loop ops and their backend selection."""
from meta_kernels import _extension
from meta_kernels.ops import _autograd
from meta_kernels.ops._backend import BACKENDS, backend_info, current_backend, use_backend
from meta_kernels.ops.api import batch_norm, clip_grad_norm, reptile_update_, sgd_step, sgd_step_

if _extension.HAS_CPP:
    _autograd.register("meta_kernels")

__all__ = ["BACKENDS", "backend_info", "batch_norm", "clip_grad_norm", "current_backend", "reptile_update_",
           "sgd_step", "sgd_step_", "use_backend"]
