"""Helpers shared by the Triton op files."""
from __future__ import annotations

import torch
import triton.language as tl

NAMESPACE = "meta_kernels_triton"


def compute_dtype(dtype: torch.dtype):
    """Float64 stays float64; every other float type computes in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
