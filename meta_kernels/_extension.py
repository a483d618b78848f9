"""Guarded load of the compiled library: `import meta_kernels` works without it (reference
backend), with one warning that says why and how to build it."""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libc10/libtorch that _C links against)

try:
    from meta_kernels import _C  # importing registers the meta_kernels:: ops with torch
    LOAD_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure (missing .so, ABI mismatch) means "not built"
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "meta_kernels: the compiled ops (meta_kernels._C) could not be loaded "
        f"({LOAD_ERROR}); every op falls back to the pure-PyTorch reference backend. "
        "Build them with `pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning, stacklevel=2)


def build_info() -> dict:
    """What the compiled library contains; all False when it is not loaded."""
    if _C is None:
        return {"cpu": False, "cuda": False, "cuda_archs": "", "openmp": False, "num_threads": 0,
                "torch_version_built": None, "load_error": LOAD_ERROR}
    return dict(_C.build_info(), load_error=None)


HAS_CPP = _C is not None
HAS_CUDA_KERNELS = bool(HAS_CPP and _C.build_info()["cuda"])
