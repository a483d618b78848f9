"""Helpers shared by the Triton kernel files."""
from __future__ import annotations

import torch
import triton.language as tl

from meta_kernels.tensor_utils import compute_dtype


def tl_compute_dtype(dtype: torch.dtype):
    """The Triton type a kernel computes in for tensors of `dtype` (see tensor_utils.compute_dtype)."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32
