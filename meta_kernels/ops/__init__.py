"""The fused inner-loop ops and their backend selection."""
import torch as _torch

from meta_kernels import _extension
from meta_kernels.ops import _autograd, _backend
from meta_kernels.ops._backend import BACKENDS, backend_info, current_backend, use_backend
from meta_kernels.ops.api import (batch_norm, clip_grad_norm, conv3x3_bn_pool_relu, has_conv3x3_bn_pool_relu,
                                  max_pool2x2_relu, reptile_update_, sgd_step, sgd_step_)

if _extension.HAS_CPP:
    _autograd.register("meta_kernels")
    _autograd.register_conv3x3_bn_pool_relu("meta_kernels")

# Register the Triton ops up front where they can run, so a torch.compile trace never has to
# import them; elsewhere they load on the first explicit request.
if _backend.TRITON_INSTALLED and (_backend.TRITON_INTERPRETED or _torch.cuda.is_available()):
    from meta_kernels import triton as _triton_ops  # noqa: F401

__all__ = ["BACKENDS", "backend_info", "batch_norm", "clip_grad_norm", "conv3x3_bn_pool_relu", "current_backend",
           "has_conv3x3_bn_pool_relu", "max_pool2x2_relu",
           "reptile_update_", "sgd_step", "sgd_step_", "use_backend"]
