"""Two small rules every layer shares (ops, Triton kernels, the inner loop), written once.

- The compute dtype: half and bfloat16 are storage types; arithmetic runs in float32, and
  float32 / float64 compute in themselves (the inner loop never runs in half precision).
- A per-task vector [T] broadcast against a [T, ...] tensor (clip factors, task masks)."""
from __future__ import annotations

import torch
from torch import Tensor

HALF_TYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 -> float32; every other dtype unchanged."""
    return torch.float32 if dtype in HALF_TYPES else dtype


def to_compute(t: Tensor) -> Tensor:
    """`t` in its compute dtype (a copy only for half and bfloat16)."""
    return t.float() if t.dtype in HALF_TYPES else t


def task_view(v: Tensor, like: Tensor) -> Tensor:
    """[T] -> [T, 1, ..., 1], broadcastable against `like` of shape [T, ...]."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))
