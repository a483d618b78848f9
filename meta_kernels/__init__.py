"""meta_kernels: gradient-based meta-learning on fused inner-loop kernels."""
from meta_kernels.ops import (BACKENDS, backend_info, batch_norm, clip_grad_norm, current_backend, reptile_update_,
                              sgd_step, sgd_step_, use_backend)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backend_info", "batch_norm", "clip_grad_norm", "current_backend", "reptile_update_",
           "sgd_step", "sgd_step_", "use_backend"]
