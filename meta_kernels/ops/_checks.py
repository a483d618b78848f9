"""Argument rules shared by several ops (lists of tensors, a leading task dim, in-place updates),
and `checked_call`, which runs an op's checks. Every rule with its user-facing message lives in
Python (here and in `ops/<op>.py`); the fake kernels run the same checks (a meta tensor among real
ones dispatches there); the C++ kernels keep only the invariants that protect memory
(csrc/common.h), terse, and a refusal there makes the front-end run the Python check for the
message."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def uniform_list(tensors, name: str) -> None:
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty; pass at least one tensor")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise ValueError(f"{name}[{i}] must be floating point, got {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name}[{i}] is {t.dtype} but {name}[0] is {first.dtype}; all tensors of one call share a dtype")
        if t.device != first.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {first.device}")


def same_as(tensors, ref, name: str, ref_name: str) -> None:
    """One tensor per tensor of ref, of its shape, dtype and device."""
    if len(tensors) != len(ref):
        raise ValueError(f"{name} has {len(tensors)} tensors but {ref_name} has {len(ref)}; pass one per tensor")
    for i, (t, r) in enumerate(zip(tensors, ref)):
        if t.shape != r.shape:
            raise ValueError(f"{name}[{i}] has shape {list(t.shape)} but {ref_name}[{i}] has shape {list(r.shape)}")
    same_as_dtype_device(tensors, ref, name, ref_name)


def same_as_dtype_device(tensors, ref, name: str, ref_name: str) -> None:
    """One tensor per tensor of ref, of its dtype and device (any shape)."""
    if len(tensors) != len(ref):
        raise ValueError(f"{name} has {len(tensors)} tensors but {ref_name} has {len(ref)}; pass one per tensor")
    for i, (t, r) in enumerate(zip(tensors, ref)):
        if t.dtype != r.dtype:
            raise ValueError(f"{name}[{i}] is {t.dtype} but {ref_name}[{i}] is {r.dtype}")
        if t.device != r.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {ref_name}[{i}] is on {r.device}")


def leading_tasks(tensors, name: str) -> int:
    """The number of tasks T that every tensor carries in dim 0."""
    for i, t in enumerate(tensors):
        if t.dim() < 1:
            raise ValueError(f"{name}[{i}] is 0-dim but a leading task dim is required")
    T = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != T:
            raise ValueError(f"{name}[{i}] has {t.shape[0]} tasks in dim 0 but {name}[0] has {T}")
    return T


def same_device(t: Tensor, name: str, like: Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def no_graph_for_in_place(params: Sequence[Tensor], op: str) -> None:
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise RuntimeError(f"{op} updates tensors in place and records no graph, but params require grad; "
                           "call it under torch.no_grad() or use the differentiable out-of-place op")


def scalar(value, name: str, allowed: str, ok) -> float:
    """`value` as a float, refused unless ok(value): the scalar arguments of the ops (eps,
    momentum, epsilon), checked in Python on every backend -- the kernels take any double."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}") from None
    if not ok(v):  # NaN fails every comparison, so it is refused too
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def non_empty(tensors: Sequence[Tensor], name: str) -> list[Tensor]:
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name} is empty; pass at least one tensor")
    return tensors


# Backends without compiled invariant checks of their own.
_CHECKED_BEFORE_DISPATCH = ("reference", "triton")


def checked_call(backend: str, check, call):
    """Runs `call()` on `backend` with the op's argument checks (`check()`, raising ValueError).

    The Python-side backends and traced code check first (under torch.compile the check costs
    nothing at run time). A compiled kernel checks its memory-safety invariants in C++ itself, so
    the Python check -- tens of microseconds over a long tensor list, a third of a small fused
    update -- runs only when the kernel refuses the arguments, to say what was wrong."""
    if backend in _CHECKED_BEFORE_DISPATCH or torch.compiler.is_compiling():
        check()
        return call()
    try:
        return call()
    except ValueError:
        check()
        raise
