"""Triton kernels for every op, registered as torch custom ops in the `meta_kernels_triton`
namespace (a launching custom_op with a fake kernel works under torch.compile and opcheck,
also with TRITON_INTERPRET=1 on CPU tensors). Imported on first use of the triton backend."""
from meta_kernels.ops import _autograd
from meta_kernels.triton import (batch_norm, clip_grad_norm, max_pool2x2_relu, reptile_update,  # noqa: F401
                                 sgd_step)  # (importing registers the ops)
from meta_kernels.triton._common import NAMESPACE

_autograd.register(NAMESPACE)
