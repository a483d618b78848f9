"""The fused inner-loop ops, one module each (`ops/<op>.py`: checks, fake kernel, autograd,
front-end), the shared reference implementations and the backend choice. Importing an op module
adds it to `_registry.OPS`, from which the fakes and autograd of every namespace are registered."""
import torch as _torch

from meta_kernels import _extension
from meta_kernels.ops import _backend, _registry
from meta_kernels.ops._backend import BACKENDS, backend_info, current_backend, use_backend
from meta_kernels.ops.adam_step import adam_step, adam_step_
from meta_kernels.ops.batch_norm import batch_norm
from meta_kernels.ops.clip_grad_norm import clip_grad_norm
from meta_kernels.ops.conv3x3_bn_pool_relu import conv3x3_bn_pool_relu, has_conv3x3_bn_pool_relu
from meta_kernels.ops.max_pool2x2_relu import max_pool2x2_relu
from meta_kernels.ops.momentum_step import momentum_step, momentum_step_
from meta_kernels.ops.reptile_update import reptile_update_
from meta_kernels.ops.sgd_step import sgd_step, sgd_step_

OPS = _registry.OPS

if _extension.HAS_CPP:
    _registry.register_fakes_and_autograd(_registry.COMPILED_NAMESPACE)

# Register the Triton ops up front where they can run, so a torch.compile trace never has to
# define them; elsewhere they are defined on the first explicit request.
if _backend.TRITON_INSTALLED and (_backend.TRITON_INTERPRETED or _torch.cuda.is_available()):
    _registry.register_triton()

__all__ = ["BACKENDS", "OPS", "adam_step", "adam_step_", "backend_info", "batch_norm", "clip_grad_norm", "conv3x3_bn_pool_relu",
           "current_backend", "has_conv3x3_bn_pool_relu", "max_pool2x2_relu", "momentum_step", "momentum_step_", "reptile_update_", "sgd_step",
           "sgd_step_", "use_backend"]
