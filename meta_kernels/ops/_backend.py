"""Which implementation runs an op: chosen per call (`backend=`), per context
(`use_backend(...)`) or by the META_KERNELS_BACKEND environment variable (read at import).

The choice lives in a module global rather than a ContextVar so that torch.compile can trace
through it (dynamo guards on module globals)."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from meta_kernels import _extension

BACKENDS = ("auto", "cuda", "triton", "cpp", "reference")
CONCRETE = BACKENDS[1:]  # the backends `auto` chooses among
ENV_VAR = "META_KERNELS_BACKEND"


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {source}; choose one of {', '.join(BACKENDS)}")
    return name


def _backend_from_env() -> str:
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


_default = _backend_from_env()
_stack: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops in this block on `name` (unless a call passes its own `backend=`)."""
    _stack.append(_check_name(name, "use_backend()"))
    try:
        yield
    finally:
        _stack.pop()


def current_backend() -> str:
    return _stack[-1] if _stack else _default


# Fixed at import (triton itself reads TRITON_INTERPRET when its kernels are defined), and
# plain constants keep the choice traceable by torch.compile.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, reason if not) for a concrete backend on tensors of `device`."""
    if name == "reference":
        return True, ""
    if name == "cpp":
        if not _extension.HAS_CPP:
            return False, f"the compiled library is not loaded ({_extension.LOAD_ERROR})"
        if device.type != "cpu":
            return False, f"the cpp backend runs CPU tensors, these are on {device}; use 'cuda' or 'auto'"
        return True, ""
    if name == "cuda":
        if not _extension.HAS_CUDA_KERNELS:
            return False, "the compiled library was built without CUDA kernels (see meta_kernels.backend_info())"
        if device.type != "cuda":
            return False, f"the cuda backend runs CUDA tensors, these are on {device}; use 'cpp' or 'auto'"
        return True, ""
    if name == "triton":
        if not TRITON_INSTALLED:
            return False, "triton is not installed (pip install triton)"
        if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED):
            return True, ""
        return False, f"triton kernels run CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), these are on {device}"
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def auto_choice(device: torch.device) -> str:
    """The fastest built backend for `device`."""
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    for name in order:
        if available(name, device)[0]:
            return name
    return "reference"


def resolve(requested: str | None, device: torch.device) -> str:
    name = _check_name(requested, "backend=") if requested is not None else current_backend()
    if name == "auto":
        return auto_choice(device)
    ok, why = available(name, device)
    if not ok:
        raise RuntimeError(f"meta_kernels backend {name!r} is not usable here: {why}")
    return name


def backend_info() -> dict:
    """What was built, what is installed, and what `auto` picks per device."""
    info = {"extension": _extension.build_info(), "triton_installed": TRITON_INSTALLED,
            "triton_interpret": TRITON_INTERPRETED, "default_backend": current_backend(),
            "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "auto": {"cpu": auto_choice(torch.device("cpu"))}}
    if torch.cuda.is_available():
        info["auto"]["cuda"] = auto_choice(torch.device("cuda"))
        info["cuda_device"] = torch.cuda.get_device_name()
    return info
