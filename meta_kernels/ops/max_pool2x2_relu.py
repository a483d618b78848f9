"""max_pool2x2_relu: relu(max_pool2d(x, 2)) over the last two dims in one pass, with the int8
position of each kept maximum; its backward routes grad_out to those positions, and the
backward's adjoint (MAML's double backward) is one gather. Checks, fake kernels, autograd and
the front-end; kernels in csrc/cpu/max_pool2x2_relu.cpp, csrc/cuda/max_pool2x2_relu.cu and
meta_kernels/triton/max_pool2x2_relu.py."""
from __future__ import annotations

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, reference


# ---- checks ----------------------------------------------------------------------------------

def check_args(x: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be [..., H, W], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.shape[-2] < 2 or x.shape[-1] < 2:
        raise ValueError(f"max_pool2x2_relu needs H >= 2 and W >= 2, got x of shape {list(x.shape)}")


def check_index(index: Tensor, other: Tensor, name: str) -> None:
    if index.dtype != torch.int8:
        raise ValueError(f"index must be torch.int8 (from max_pool2x2_relu), got {index.dtype}")
    _checks.same_device(index, "index", other, name)


def check_backward_args(grad_out: Tensor, index: Tensor, height: int, width: int) -> None:
    if grad_out.dim() < 2 or not grad_out.is_floating_point():
        raise ValueError(f"grad_out must be a floating [..., H / 2, W / 2] tensor, got {grad_out.dtype} {list(grad_out.shape)}")
    check_index(index, grad_out, "grad_out")
    if index.shape != grad_out.shape:
        raise ValueError(f"index has shape {list(index.shape)} but grad_out has shape {list(grad_out.shape)}")
    if (height // 2, width // 2) != tuple(grad_out.shape[-2:]):
        raise ValueError(f"height {height} and width {width} do not pool to grad_out's "
                         f"{grad_out.shape[-2]} x {grad_out.shape[-1]}")


def check_gather_args(grad_x: Tensor, index: Tensor) -> None:
    if grad_x.dim() < 2 or not grad_x.is_floating_point():
        raise ValueError(f"grad_x must be a floating [..., H, W] tensor, got {grad_x.dtype} {list(grad_x.shape)}")
    check_index(index, grad_x, "grad_x")
    pooled = [*grad_x.shape[:-2], grad_x.shape[-2] // 2, grad_x.shape[-1] // 2]
    if list(index.shape) != pooled:
        raise ValueError(f"index has shape {list(index.shape)} but grad_x of shape {list(grad_x.shape)} pools to {pooled}")


# ---- fake kernels ----------------------------------------------------------------------------

def _fake(x):
    check_args(x)
    shape = (*x.shape[:-2], x.shape[-2] // 2, x.shape[-1] // 2)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8)


def _fake_backward(grad_out, index, height, width):
    check_backward_args(grad_out, index, height, width)
    return grad_out.new_empty((*grad_out.shape[:-2], height, width))


def _fake_gather(grad_x, index):
    check_gather_args(grad_x, index)
    return grad_x.new_empty(index.shape)


# ---- autograd: forward -> backward -> gather -> backward ... (each linear in its input) --------

def _autograd(ns):
    def setup(ctx, inputs, output):
        (x,) = inputs
        ctx.height, ctx.width = x.shape[-2], x.shape[-1]
        ctx.save_for_backward(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_index):
        if grad_out is None:
            return None
        (index,) = ctx.saved_tensors
        return ns.max_pool2x2_relu_backward(grad_out, index, ctx.height, ctx.width)

    return backward, setup


def _backward_autograd(ns):
    """The backward is linear in grad_out: its adjoint is the gather."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward(ctx, grad_grad_x):
        (index,) = ctx.saved_tensors
        return ns.max_pool2x2_relu_gather(grad_grad_x, index), None, None, None

    return backward, setup


def _gather_autograd(ns):
    """The gather's adjoint is the backward again."""

    def setup(ctx, inputs, output):
        grad_x, index = inputs
        ctx.height, ctx.width = grad_x.shape[-2], grad_x.shape[-1]
        ctx.save_for_backward(index)

    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        return ns.max_pool2x2_relu_backward(grad_out, index, ctx.height, ctx.width), None

    return backward, setup


# ---- front-end -------------------------------------------------------------------------------

def max_pool2x2_relu(x: Tensor, *, backend: str | None = None) -> Tensor:
    """relu(max_pool2d(x, 2)) over the last two dims of x [..., H, W] in one pass (an odd last row
    or column is dropped, as in max_pool2d). Differentiable to any order."""
    name = _backend.resolve(backend, x.device)
    op = reference.max_pool2x2_relu if name == "reference" else _registry.namespace(name).max_pool2x2_relu
    return _checks.checked_call(name, lambda: check_args(x), lambda: op(x))[0]


# ---- samples for opcheck and the self-check --------------------------------------------------

def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()
    index = lambda *s: torch.randint(-1, 4, s, generator=g, dtype=torch.int8).to(device)
    return [("max_pool2x2_relu", (rnd(2, 3, 6, 7),)),
            ("max_pool2x2_relu_backward", (rnd(2, 3, 3, 3), index(2, 3, 3, 3), 6, 7)),
            ("max_pool2x2_relu_gather", (rnd(2, 3, 6, 7), index(2, 3, 3, 3)))]


def _selfcheck(backend: str) -> None:
    x = torch.randn(2, 3, 7, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    out, ref_out = max_pool2x2_relu(x, backend=backend), reference.max_pool2x2_relu(x)[0]
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x), torch.autograd.grad(ref_out.sum(), x))


OP = _registry.add(_registry.OpDef(
    name="max_pool2x2_relu",
    kernels=(_registry.Kernel("max_pool2x2_relu", "(Tensor x) -> (Tensor out, Tensor index)", _fake, _autograd),
             _registry.Kernel("max_pool2x2_relu_backward",
                              "(Tensor grad_out, Tensor index, int height, int width) -> Tensor",
                              _fake_backward, _backward_autograd),
             _registry.Kernel("max_pool2x2_relu_gather", "(Tensor grad_x, Tensor index) -> Tensor",
                              _fake_gather, _gather_autograd)),
    backends=_backend.CONCRETE, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck, triton_module="max_pool2x2_relu"))
