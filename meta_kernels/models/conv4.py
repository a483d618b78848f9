"""Conv4: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2] and a linear head (Finn et al. 2017), with
MAML++'s per-step BatchNorm (StepBatchNorm), and the grouped conv whose double backward the
task-batching engine uses for MAML's inner steps."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-5
_aten = torch.ops.aten


class _GroupedConv(torch.autograd.Function):
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) whose backward is
    `_GroupedConvBackward`: for passes whose gradient is differentiated again (MAML's inner steps)."""

    @staticmethod
    def forward(x, weight, bias, groups, stride=(1, 1), padding=(1, 1), dilation=(1, 1)):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, groups, stride, padding, dilation = (*inputs, (1, 1), (1, 1), (1, 1))[:7]
        ctx.conv = (groups, _pair(stride), _pair(padding), _pair(dilation))
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _GroupedConvBackward.apply(grad_out, x, weight, ctx.conv, need[0], need[1], need[2])
        return (*grads, None, None, None, None)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_backward(grad_out, x, weight, conv, mask):
    groups, stride, padding, dilation = conv
    return _aten.convolution_backward(grad_out, x, weight, [weight.shape[0]], list(stride), list(padding),
                                      list(dilation), False, [0, 0], groups, mask)


class _GroupedConvBackward(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) of the grouped conv, with a double backward written in
    grouped convolutions (aten's own runs a loop over the groups, one per task) that keeps only
    what its terms need: without a gradient for x (the first layer's input images) grad_out is
    not kept, since it enters only the second-order terms of x."""

    @staticmethod
    def forward(grad_out, x, weight, conv, need_x, need_w, need_b):
        return tuple(_conv_backward(grad_out, x, weight, conv, [need_x, need_w, need_b]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, ctx.conv, need_x, _, _ = inputs
        ctx.kept_grad_out, ctx.out_shape = need_x, grad_out.shape
        ctx.save_for_backward(x, weight, *([grad_out] if need_x else []))

    @staticmethod
    def backward(ctx, gg_x, gg_w, gg_b):
        x, weight, *rest = ctx.saved_tensors
        need_go, need_x, need_w = ctx.needs_input_grad[:3]
        groups, stride, padding, dilation = ctx.conv
        d_go = d_x = d_w = None
        if need_go:  # grad_out enters all three outputs linearly
            parts = []
            if gg_w is not None:
                parts.append(F.conv2d(x, gg_w, None, stride, padding, dilation, groups))
            if gg_x is not None:
                parts.append(F.conv2d(gg_x, weight, None, stride, padding, dilation, groups))
            if gg_b is not None:
                parts.append(gg_b.reshape(1, -1, 1, 1).expand(ctx.out_shape))
            d_go = sum(parts[1:], parts[0]) if parts else None
        if ctx.kept_grad_out:
            (grad_out,) = rest
            if need_x and gg_w is not None:  # grad_weight = corr(x, grad_out)
                d_x = _conv_backward(grad_out, x, gg_w, ctx.conv, [True, False, False])[0]
            if need_w and gg_x is not None:  # grad_x = conv_transpose(grad_out, weight)
                d_w = _conv_backward(grad_out, gg_x, weight, ctx.conv, [False, True, False])[1]
        return d_go, d_x, d_w, None, None, None, None


class StepBatchNorm(nn.Module):
    """BatchNorm whose affine has one row per inner step (MAML++ per-step BN) or a single row,
    with running statistics per row. On the task-batching engine the inner loop normalises with
    the statistics of the current set (transductive, per_step) or with the running statistics
    (frozen); see meta_kernels.meta.batching._TaskStepBatchNorm. Its plain forward (one task)
    uses batch statistics and the first row."""
    eps = BN_EPS

    def __init__(self, channels: int, steps: int = 1, momentum: float = 0.1):
        super().__init__()
        shape = (channels,) if steps == 1 else (steps, channels)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(steps, channels))
        self.register_buffer("running_var", torch.ones(steps, channels))
        self.momentum = momentum

    def forward(self, x: Tensor) -> Tensor:
        w, b = (self.weight, self.bias) if self.weight.dim() == 1 else (self.weight[0], self.bias[0])
        return F.batch_norm(x, None, None, w, b, True, 0.0, BN_EPS)


class Conv4(nn.Sequential):
    """An ordinary nn.Sequential -- blocks.{i}: conv, bn (StepBatchNorm), relu, pool; flatten;
    head -- whose tasks run batched on the task-batching engine like any user model (its blocks on
    the fused ops: the input block as conv3x3_bn_pool_relu, the others' BN, ReLU and pool as
    batch_norm + max_pool2x2_relu)."""

    def __init__(self, in_channels: int = 1, n_way: int = 5, filters: int = 64, image_size: int = 28,
                 bn_steps: int = 1):
        for name, value, least in (("in_channels", in_channels, 1), ("n_way", n_way, 2), ("filters", filters, 1),
                                   ("image_size", image_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Conv4: {name} must be an integer >= {least}, got {value!r}")
        if bn_steps < 1:
            raise ValueError(f"bn_steps must be >= 1 (inner steps + 1 for per-step BN), got {bn_steps}")
        blocks, c_in, size = [], in_channels, image_size
        for _ in range(4):
            blocks.append(nn.Sequential(OrderedDict(conv=nn.Conv2d(c_in, filters, 3, padding=1),
                                                    bn=StepBatchNorm(filters, bn_steps), relu=nn.ReLU(),
                                                    pool=nn.MaxPool2d(2))))
            c_in, size = filters, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 poolings (needs >= 16)")
        super().__init__(OrderedDict(blocks=nn.Sequential(*blocks), flatten=nn.Flatten(),
                                     head=nn.Linear(filters * size * size, n_way)))
        self.in_channels, self.n_way, self.filters, self.image_size = in_channels, n_way, filters, image_size
        self.feature_dim = filters * size * size

    @classmethod
    def omniglot(cls, n_way: int = 5, **kw) -> "Conv4":
        return cls(in_channels=1, n_way=n_way, filters=64, image_size=28, **kw)

    @classmethod
    def mini_imagenet(cls, n_way: int = 5, filters: int = 32, **kw) -> "Conv4":
        return cls(in_channels=3, n_way=n_way, filters=filters, image_size=84, **kw)
