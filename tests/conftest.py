"""Shared test set-up. Triton kernels run under the interpreter on CPU tensors when there is no
GPU; TRITON_INTERPRET must be set before the kernels are defined, hence here."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import meta_kernels  # noqa: E402,F401  (imported after TRITON_INTERPRET is set)

HAS_CUDA = torch.cuda.is_available()


def backend_devices():
    """Every (backend, device) pair, skipped only where the hardware is missing: on a machine
    without a GPU the cpp and triton (interpreted) backends must work, so they are not skipped."""
    pairs = []
    for backend, device in (("reference", "cpu"), ("cpp", "cpu"), ("triton", "cpu"),
                            ("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")):
        marks = []
        if device == "cuda" and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif backend == "triton" and device == "cpu" and HAS_CUDA:
            marks.append(pytest.mark.skip(reason="triton runs CPU tensors only under TRITON_INTERPRET=1 (GPU here)"))
        pairs.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return pairs


# Absolute floors per dtype for the "no worse than PyTorch itself" comparisons.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_no_worse_than_torch(ours, ref_same_dtype, truth, dtype, *, factor=2.0, what=""):
    """|ours - truth| <= factor * |torch reference in the same dtype - truth| + floor(dtype)."""
    ours, ref, truth = ours.double(), ref_same_dtype.double(), truth.double()
    err = (ours - truth).abs().max().item() if ours.numel() else 0.0
    ref_err = (ref - truth).abs().max().item() if ours.numel() else 0.0
    bound = factor * ref_err + TOLERANCE[dtype] * max(1.0, truth.abs().max().item() if truth.numel() else 1.0)
    assert err <= bound, f"{what}: max error {err:.3e} vs torch's own {ref_err:.3e} (bound {bound:.3e}) in {dtype}"


# Dtypes every op is swept over: bfloat16 is storage only (the kernels compute in float32).
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
F64 = dict(dtype=torch.float64)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check_grad_and_gradgrad(fn, inputs):
    """gradcheck and gradgradcheck in float64: the second-order MAML meta-gradient flows through
    every backward formula."""
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# Per-task parameter shapes of the list ops: numel 1, odd sizes, a conv weight, one crossing the
# CPU chunk (16384).
SHAPE_SETS = {
    "numel1": [(1,)],
    "mixed": [(1027,), (3, 5, 7), (64, 1, 3, 3), (1,), (16411,)],
}


def tensor_lists(shapes, T, dtype, device, seed):
    """Two lists (params, grads) of random tensors of `shapes`, with a leading task dim T unless None."""
    g = gen(seed)
    lead = () if T is None else (T,)
    make = lambda s: torch.randn(lead + s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return [make(s) for s in shapes], [make(s) for s in shapes]


def as_float64(ts):
    return [t.double() for t in ts]


def small_lists(device, T=3):
    """Two small lists (params, grads) of 2 tensors with T tasks, for the bad-input tests."""
    p = [torch.randn(T, 4, device=device), torch.randn(T, 2, 3, device=device)]
    return p, [torch.randn_like(t) for t in p]
