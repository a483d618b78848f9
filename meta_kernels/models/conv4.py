"""Conv4: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2] and a linear head (Finn et al. 2017).

Besides the ordinary nn.Module forward, `forward_tasks` runs T tasks with T sets of weights in
one computation: activations are laid out [N, T*C, H, W], so every conv is one grouped
convolution (groups = T) and per-task BatchNorm is BatchNorm over T*C channels -- statistics
never mix tasks, and no Python loop over tasks runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import meta_kernels.ops as ops

BN_EPS = 1e-5
# Layers with at most this many input channels (the first: images) run as conv3x3_bn_pool_relu.
FUSED_INPUT_CHANNELS = 4
_aten = torch.ops.aten


class _GroupedConv(torch.autograd.Function):
    """F.conv2d(x, weight, bias, padding=1, groups=groups) whose backward is `_GroupedConvBackward`:
    for passes whose gradient is differentiated again (MAML's inner steps)."""

    @staticmethod
    def forward(x, weight, bias, groups):
        return F.conv2d(x, weight, bias, padding=1, groups=groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, ctx.groups = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _GroupedConvBackward.apply(grad_out, x, weight, ctx.groups, need[0], need[1], need[2])
        return (*grads, None)


def _conv_backward(grad_out, x, weight, groups, mask):
    return _aten.convolution_backward(grad_out, x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0],
                                      groups, mask)


class _GroupedConvBackward(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) of the grouped conv, with a double backward written in
    grouped convolutions (aten's own runs a loop over the groups, one per task) that keeps only
    what its terms need: without a gradient for x (the first layer's input images) grad_out is
    not kept, since it enters only the second-order terms of x."""

    @staticmethod
    def forward(grad_out, x, weight, groups, need_x, need_w, need_b):
        return tuple(_conv_backward(grad_out, x, weight, groups, [need_x, need_w, need_b]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, ctx.groups, need_x, _, _ = inputs
        ctx.kept_grad_out = need_x
        ctx.save_for_backward(x, weight, *([grad_out] if need_x else []))

    @staticmethod
    def backward(ctx, gg_x, gg_w, gg_b):
        x, weight, *rest = ctx.saved_tensors
        need_go, need_x, need_w = ctx.needs_input_grad[:3]
        d_go = d_x = d_w = None
        if need_go:  # grad_out enters all three outputs linearly
            parts = []
            if gg_w is not None:
                parts.append(F.conv2d(x, gg_w, None, padding=1, groups=ctx.groups))
            if gg_x is not None:
                parts.append(F.conv2d(gg_x, weight, None, padding=1, groups=ctx.groups))
            if gg_b is not None:
                parts.append(gg_b.reshape(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]))
            d_go = sum(parts[1:], parts[0]) if parts else None
        if ctx.kept_grad_out:
            (grad_out,) = rest
            if need_x and gg_w is not None:  # grad_weight = corr(x, grad_out)
                d_x = _conv_backward(grad_out, x, gg_w, ctx.groups, [True, False, False])[0]
            if need_w and gg_x is not None:  # grad_x = conv_transpose(grad_out, weight)
                d_w = _conv_backward(grad_out, gg_x, weight, ctx.groups, [False, True, False])[1]
        return d_go, d_x, d_w, None, None, None, None


class StepBatchNorm(nn.Module):
    """BatchNorm whose affine has one row per inner step (MAML++ per-step BN) or a single row,
    with running statistics per row. The inner loop normalises with the statistics of the
    current set (transductive, per_step) or with the running statistics (frozen)."""

    def __init__(self, channels: int, steps: int = 1, momentum: float = 0.1):
        super().__init__()
        shape = (channels,) if steps == 1 else (steps, channels)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(steps, channels))
        self.register_buffer("running_var", torch.ones(steps, channels))
        self.momentum = momentum

    def forward(self, x: Tensor) -> Tensor:  # one task, batch statistics, the first row
        w, b = (self.weight, self.bias) if self.weight.dim() == 1 else (self.weight[0], self.bias[0])
        return F.batch_norm(x, None, None, w, b, True, 0.0, BN_EPS)


class Conv4(nn.Module):
    def __init__(self, in_channels: int = 1, n_way: int = 5, filters: int = 64, image_size: int = 28,
                 bn_steps: int = 1):
        super().__init__()
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}")
        if bn_steps < 1:
            raise ValueError(f"bn_steps must be >= 1 (inner steps + 1 for per-step BN), got {bn_steps}")
        self.in_channels, self.n_way, self.filters, self.image_size = in_channels, n_way, filters, image_size
        blocks, c_in, size = [], in_channels, image_size
        for _ in range(4):
            blocks.append(nn.ModuleDict({"conv": nn.Conv2d(c_in, filters, 3, padding=1),
                                         "bn": StepBatchNorm(filters, bn_steps)}))
            c_in, size = filters, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 poolings (needs >= 16)")
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = filters * size * size
        self.head = nn.Linear(self.feature_dim, n_way)

    @classmethod
    def omniglot(cls, n_way: int = 5, **kw) -> "Conv4":
        return cls(in_channels=1, n_way=n_way, filters=64, image_size=28, **kw)

    @classmethod
    def mini_imagenet(cls, n_way: int = 5, filters: int = 32, **kw) -> "Conv4":
        return cls(in_channels=3, n_way=n_way, filters=filters, image_size=84, **kw)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = F.max_pool2d(F.relu(block["bn"](block["conv"](x))), 2)
        return self.head(x.flatten(1))

    @staticmethod
    def forward_tasks(params: dict[str, Tensor], x: Tensor, *, step: int = 0, bn_mode: str = "transductive",
                      buffers: dict[str, Tensor] | None = None, update_stats: bool = False,
                      double_backward: bool = False) -> Tensor:
        """Logits [T, N, n_way] of x [T, N, C, H, W] under per-task params (each [T, *shape]).

        step: updates applied so far (selects the per-step BN row). bn_mode 'frozen' normalises
        with the running statistics in `buffers`; update_stats folds this pass's statistics,
        averaged over tasks, into them (outer-loop training passes only)."""
        T, N = x.shape[0], x.shape[1]
        h = x.transpose(0, 1).reshape(N, T * x.shape[2], *x.shape[3:])
        for i in range(4):
            w = params[f"blocks.{i}.conv.weight"]
            c_out = w.shape[1]
            w, bias = w.reshape(T * c_out, *w.shape[2:]), params[f"blocks.{i}.conv.bias"].reshape(-1)
            gamma, beta = params[f"blocks.{i}.bn.weight"], params[f"blocks.{i}.bn.bias"]
            row = min(step, gamma.shape[1] - 1) if gamma.dim() == 3 else 0
            if gamma.dim() == 3:  # per-step affine [T, steps, C]
                gamma, beta = gamma[:, row], beta[:, row]
            if (w.shape[1] <= FUSED_INPUT_CHANNELS and bn_mode == "transductive" and not update_stats
                    and ops.has_conv3x3_bn_pool_relu(h.device)):
                # The input layer as one op: its dense conv output (64x the images) is never stored,
                # nor any tensor of that size in its double backward.
                h = ops.conv3x3_bn_pool_relu(h, w, bias, gamma.reshape(-1), beta.reshape(-1), groups=T, eps=BN_EPS)
                continue
            conv = _GroupedConv.apply if double_backward else lambda *a: F.conv2d(*a[:3], padding=1, groups=a[3])
            h = conv(h, w, bias, T)
            if update_stats and buffers is not None:
                _fold_running_stats(h.detach(), buffers, f"blocks.{i}.bn", min(step, buffers[f"blocks.{i}.bn.running_mean"].shape[0] - 1), T)
            if bn_mode == "frozen":
                h = _frozen_bn(h, gamma, beta, buffers, f"blocks.{i}.bn", row, T)
            else:
                # [N, T*C, H, W] seen as one task of T*C channels: per-(task, channel) statistics.
                h = ops.batch_norm(h.unsqueeze(0), gamma.reshape(1, -1), beta.reshape(1, -1), BN_EPS).squeeze(0)
            h = ops.max_pool2x2_relu(h)  # relu(max_pool2d(h, 2)) in one pass
        feats = h.reshape(N, T, -1)
        return torch.einsum("ntd,tkd->tnk", feats, params["head.weight"]) + params["head.bias"].unsqueeze(1)


def _frozen_bn(h: Tensor, gamma: Tensor, beta: Tensor, buffers, name: str, row: int, T: int) -> Tensor:
    if buffers is None:
        raise ValueError("bn_mode='frozen' needs the model's running statistics (buffers)")
    mean = buffers[f"{name}.running_mean"][row].repeat(T)
    rstd = torch.rsqrt(buffers[f"{name}.running_var"][row] + BN_EPS).repeat(T)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return (h - mean.view(shape)) * (rstd.view(shape) * gamma.reshape(shape)) + beta.reshape(shape)


@torch.no_grad()
def _fold_running_stats(h: Tensor, buffers, name: str, row: int, T: int, momentum: float = 0.1) -> None:
    """Running statistics of one step's row <- this pass's per-task statistics averaged over tasks."""
    N, C = h.shape[0], h.shape[1] // T
    v = h.reshape(N, T, C, -1)
    mean, var = v.mean(dim=(0, 3)), v.var(dim=(0, 3), unbiased=v.shape[0] * v.shape[3] > 1)
    buffers[f"{name}.running_mean"][row].mul_(1 - momentum).add_(mean.mean(0), alpha=momentum)
    buffers[f"{name}.running_var"][row].mul_(1 - momentum).add_(var.mean(0), alpha=momentum)
