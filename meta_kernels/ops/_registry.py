"""The one list of fused ops. Every `ops/<op>.py` adds an `OpDef` here; from this list come the
fake kernels and autograd of each namespace that implements the ops, the Triton namespace, the
opcheck tests and the self-check (`meta-kernels validate`).

Namespaces: `meta_kernels` holds the compiled kernels (schemas in csrc/ops.cpp, CPU and CUDA
implementations registered by C++); `meta_kernels_triton` holds the Triton launchers, defined
here as custom ops with the same schema text."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

COMPILED_NAMESPACE = "meta_kernels"
TRITON_NAMESPACE = "meta_kernels_triton"


@dataclass(frozen=True)
class Kernel:
    """One schema: an entry point that every namespace of the op implements."""
    name: str
    # The text after the name, exactly as in csrc/ops.cpp (a test compares the two).
    schema: str
    # fake(*args): output shapes and dtypes, after the op's argument checks.
    fake: Callable
    # autograd(ns) -> (backward, setup_context), given the namespace the backward calls into.
    autograd: Callable | None = None


@dataclass(frozen=True)
class OpDef:
    """A public op: its front-end, its kernels, and the samples that test and check it."""
    name: str
    kernels: tuple[Kernel, ...]
    # Backends that run it (the rest raise a clear error from the front-end).
    backends: tuple[str, ...]
    # opcheck_cases(device) -> [(kernel name, args)]: inputs for torch.library.opcheck.
    opcheck_cases: Callable
    # selfcheck(backend): raises when the backend disagrees with the reference on a small input.
    selfcheck: Callable
    # meta_kernels.triton.<module>, which defines one launcher per kernel name.
    triton_module: str | None = None


OPS: dict[str, OpDef] = {}


def add(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise RuntimeError(f"op {op.name!r} is registered twice")
    OPS[op.name] = op
    return op


def kernels() -> list[Kernel]:
    return [k for op in OPS.values() for k in op.kernels]


def mutated_args(schema: str) -> set[str]:
    """Names of the arguments a schema writes to (`Tensor(a!)`)."""
    parsed = torch._C.parse_schema(f"{COMPILED_NAMESPACE}::op{schema}")
    return {a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write}


def register_fakes_and_autograd(namespace: str, only: set[str] | None = None) -> None:
    """Fake kernels and autograd of every kernel of `namespace` (or of those named in `only`)."""
    ns = getattr(torch.ops, namespace)
    for kernel in kernels():
        if only is not None and kernel.name not in only:
            continue
        qualname = f"{namespace}::{kernel.name}"
        torch.library.register_fake(qualname, kernel.fake, allow_override=True)
        if kernel.autograd is not None:
            backward, setup = kernel.autograd(ns)
            torch.library.register_autograd(qualname, backward, setup_context=setup)


_triton_registered = False


def register_triton() -> None:
    """Defines the Triton namespace from the launchers in meta_kernels/triton (once)."""
    global _triton_registered
    if _triton_registered:
        return
    for op in OPS.values():
        if op.triton_module is None:
            continue
        module = importlib.import_module(f"meta_kernels.triton.{op.triton_module}")
        for kernel in op.kernels:
            torch.library.custom_op(f"{TRITON_NAMESPACE}::{kernel.name}", getattr(module, kernel.name),
                                    mutates_args=mutated_args(kernel.schema), schema=kernel.schema)
    register_fakes_and_autograd(TRITON_NAMESPACE, {k.name for op in OPS.values() if op.triton_module
                                                   for k in op.kernels})
    _triton_registered = True


def namespace(backend: str):
    """The torch.ops namespace that runs `backend` ('cpp', 'cuda' or 'triton')."""
    if backend == "triton":
        register_triton()
        return getattr(torch.ops, TRITON_NAMESPACE)
    return getattr(torch.ops, COMPILED_NAMESPACE)
