"""Two small rules every layer shares (ops, Triton kernels, the inner loop), written once.

- The compute dtype: half and bfloat16 are storage types; arithmetic runs in float32, and
  float32 / float64 compute in themselves (the inner loop never runs in half precision).
- A per-task vector [T] broadcast against a [T, ...] tensor (clip factors, task masks).
- A function applied to every tensor of a model's input or output, whatever its structure."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

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


def map_structure(fn: Callable[[Tensor], Tensor], obj):
    """`obj` with fn applied to every tensor in it, the structure kept: tuples (named ones too),
    lists, dicts (and their subclasses, e.g. Hugging Face's ModelOutput), dataclasses; anything
    else is returned as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_structure(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_structure(fn, v) for v in obj)
    if isinstance(obj, dict):
        items = {k: map_structure(fn, v) for k, v in obj.items()}
        return items if type(obj) is dict else type(obj)(**items) if dataclasses.is_dataclass(obj) else type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_structure(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def structure_tensors(obj) -> list[Tensor]:
    """The tensors of `obj`, in map_structure's order."""
    found: list[Tensor] = []
    map_structure(lambda t: found.append(t) or t, obj)
    return found
