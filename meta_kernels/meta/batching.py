"""The task-batching engine: a user's own nn.Module runs T tasks at once, each with its own
weights, through its unchanged `forward`.

How: the inputs of T tasks, each [T, N, ...], are folded into one batch [T*N, ...], so the user's
forward (reshapes, residual adds, concatenations, activations, pooling, dropout, F.* calls) runs
as written on T*N samples. Only the layers that hold parameters or use batch statistics need to
know about tasks; in a *view* of the model (the same parameter and buffer objects, other
classes) they are replaced by task-aware versions that take each parameter as [T, *shape]
(adapted per task) or [*shape] (shared, e.g. frozen):

- Conv1d / Conv2d: one grouped convolution over the tasks (groups = T * groups);
- Linear: one batched matmul; Embedding: one lookup in the T stacked tables;
- BatchNorm1d / 2d / 3d: per-task batch statistics through the fused `batch_norm` op (never mixed
  between tasks, correct to second order), running statistics updated as T successive batches in
  task order (what a per-task loop over the same pass leaves), eval mode with the running
  statistics;
- LayerNorm / GroupNorm: per-sample statistics, per-task affine.

A leaf module with parameters that the engine does not know runs under torch.func.vmap over the
tasks for that module alone, or, when vmap cannot run it, in a per-task loop for that module
alone; the rest of the model stays batched. `explain(model)` lists how each layer runs.

What the fold assumes: the forward treats samples independently outside the known layers. A
forward that mixes samples across the batch elsewhere (`x.mean(0)`, a hand-written batch norm)
would mix tasks; `check_task_independence` (the `debug_batching` option of MetaLearner) compares
one task run alone with the batched result and says so.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call
from torch.nn.modules.utils import _pair

from meta_kernels import ops
from meta_kernels.models.conv4 import StepBatchNorm, _GroupedConv
from meta_kernels.ops.batch_norm import fold_running_stats
from meta_kernels.tensor_utils import map_structure
from meta_kernels.ops.conv3x3_bn_pool_relu import MAX_IN_CHANNELS as MAX_FUSED_IN_CHANNELS

# ---- folding the task dim into the batch dim -------------------------------------------------

def fold(t, T: int):
    """[T, N, ...] -> [T*N, ...] for every tensor of a (nested) input."""
    def one(v: Tensor) -> Tensor:
        if v.dim() < 2 or v.shape[0] != T:
            raise ValueError(f"every input must be [T, N, ...] with T = {T} tasks, got a tensor of shape {list(v.shape)}")
        return v.reshape(T * v.shape[1], *v.shape[2:])
    return map_structure(one, t)


def unfold(t, T: int):
    """[T*N, ...] -> [T, N, ...] for every tensor of a (nested) output: a tensor, tuple, dict,
    dataclass or Hugging Face ModelOutput."""
    def one(v: Tensor) -> Tensor:
        if v.dim() < 1 or v.shape[0] % T:
            raise ValueError(f"the model returned a tensor of shape {list(v.shape)} whose first dim does not hold the "
                             f"{T} tasks' samples; outputs must keep the batch dim first")
        return v.reshape(T, v.shape[0] // T, *v.shape[1:])
    return map_structure(one, t)


def _to_channels(x: Tensor, T: int) -> Tensor:
    """[T*N, C, *s] -> [N, T*C, *s]."""
    N = x.shape[0] // T
    return x.reshape(T, N, *x.shape[1:]).transpose(0, 1).reshape(N, T * x.shape[1], *x.shape[2:])


def _to_folded(h: Tensor, T: int) -> Tensor:
    """[N, T*C, *s] -> [T*N, C, *s]."""
    N = h.shape[0]
    return h.reshape(N, T, -1, *h.shape[2:]).transpose(0, 1).reshape(T * N, -1, *h.shape[2:])


@dataclass
class _Pass:
    """What the current pass is, for the layers that care: double_backward marks a pass whose
    gradient is differentiated again (MAML's inner steps); step, bn_mode and update_stats reach
    StepBatchNorm (MAML++ per-step and frozen BatchNorm)."""
    double_backward: bool = False
    step: int = 0
    bn_mode: str = "transductive"
    update_stats: bool = False
    batch: int = 0  # the folded batch, T * N (a tensor with batch 1 broadcasts over it)
    direct_reads: list = field(default_factory=list)  # per-task weights the model's own code read


_PASS = _Pass()


def _per_task(value: Tensor | None, base_dims: int) -> bool:
    """Whether a parameter arrives stacked per task ([T, *shape]) rather than shared."""
    return value is not None and value.dim() == base_dims + 1


def _tasks_of(module: nn.Module, batch: int) -> int:
    """T, from the first of its own parameters stacked per task (1 when every one is shared)."""
    for name, dims in module._mk_base_dims.items():
        if "." in name:  # a child's parameter (MultiheadAttention's out_proj)
            continue
        value = getattr(module, name)
        if _per_task(value, dims):
            T = value.shape[0]
            if batch % T:
                raise ValueError(f"{module._mk_name}: a batch of {batch} samples does not split into {T} tasks")
            return T
    return 1


def _task_view(v: Tensor, T: int, dims_after: int) -> Tensor:
    """A per-task [T, *s] affine as [T, 1, *s, 1, ...] against x viewed [T, N, ...]."""
    return v.reshape(T, 1, *v.shape[1:], *([1] * dims_after))


# ---- task-aware layers (forward only: the view keeps the original's parameters and buffers) ---

class _TaskConv:
    """Conv1d / Conv2d over folded tasks as one grouped convolution."""

    def check_channels(self, channels: int) -> None:
        """A clear error for inputs of the wrong number of channels (the grouped conv's own message
        counts the tasks' channels together)."""
        if channels != self.in_channels:
            raise ValueError(f"layer {self._mk_name} ({type(self).__bases__[-1].__name__}) takes {self.in_channels} input "
                             f"channel(s) per sample, got {channels}: give inputs [T, N, {self.in_channels}, ...] (e.g. "
                             "grayscale vs RGB images), or build the model for these channels")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() >= 2:
            self.check_channels(x.shape[1])
        w, b = self.weight, self.bias
        if not _per_task(w, self._mk_base_dims["weight"]) and not _per_task(b, 1):
            return self._conv_forward(x, w, b)  # every weight shared: the module as it is
        T = _tasks_of(self, x.shape[0])
        if not _per_task(w, self._mk_base_dims["weight"]):
            w = w.expand(T, *w.shape)
        if b is not None and not _per_task(b, 1):
            b = b.expand(T, *b.shape)
        return _to_folded(self.channels_forward(_to_channels(x, T), w, b, T), T)

    def channels_forward(self, h: Tensor, w: Tensor, b: Tensor | None, T: int) -> Tensor:
        """The conv of activations laid out [N, T*C, *s] (tasks side by side in the channels) as one
        grouped convolution; w [T, C_out, C_in / groups, *k], b [T, C_out] or None."""
        padding = self.padding
        if self.padding_mode != "zeros":
            h, padding = F.pad(h, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        if h.dim() == 4 and h.device.type == "cpu" and T > 1 and w.shape[2] == 1 and self.groups == 1 and \
                not isinstance(padding, str):
            return _single_channel_conv(h, w, b, T, self.stride, padding, self.dilation)
        w_flat, b_flat = w.reshape(T * w.shape[1], *w.shape[2:]), None if b is None else b.reshape(-1)
        if h.dim() == 4 and _PASS.double_backward and T * self.groups > 1 and not isinstance(padding, str):
            # MAML's inner steps: a grouped conv whose double backward avoids aten's per-group loop.
            return _GroupedConv.apply(h, w_flat, b_flat, T * self.groups, self.stride, padding, self.dilation)
        conv = F.conv1d if h.dim() == 3 else F.conv2d
        return conv(h, w_flat, b_flat, self.stride, padding, self.dilation, T * self.groups)


def _single_channel_conv(h: Tensor, w: Tensor, b: Tensor | None, T: int, stride, padding, dilation) -> Tensor:
    """conv2d of activations [N, T, H, W] (one input channel per task: a grayscale input layer) with
    w [T, C_out, 1, kh, kw], as each task's patches times its weights in one batched matmul. On the
    CPU oneDNN runs a grouped conv of one channel per group several times slower per FLOP than the
    others (0.8 of the 3.3 s of convolutions in a step of higher's example network, for 1/11 of
    their FLOPs); this form made those steps 8-14% faster (bench/RESULTS.md). One task (T = 1) is no
    grouped conv: oneDNN's own conv is faster there (OmniglotCNN's fused-op step 13.9 vs 15.5 ms)."""
    N, _, H, W = h.shape
    C_out, (kh, kw) = w.shape[1], w.shape[-2:]
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    cols = F.unfold(h, (kh, kw), dilation, padding, stride)  # [N, T * kh * kw, L], a task's taps together
    L = cols.shape[-1]
    cols, w = cols.view(N, T, kh * kw, L), w.reshape(T, C_out, kh * kw)
    if b is not None:
        # The bias as one more tap reading a row of ones: the matmul adds it, and its backward sums
        # the bias gradient, instead of two passes over the output (4% of that step, A/B measured).
        cols = torch.cat([cols, cols.new_ones(()).expand(N, T, 1, L)], dim=2)
        w = torch.cat([w, b.reshape(T, C_out, 1)], dim=2)
    out = torch.matmul(w, cols)  # [N, T, C_out, L]
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip((H, W), padding, dilation, (kh, kw), stride)]
    return out.view(N, T * C_out, *size)


class _TaskLinear:
    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        task_linear = getattr(w, "task_linear", None)  # a weight held in another form (compat's FactoredWeight)
        if task_linear is not None:
            T = _tasks_of(self, x.shape[0])
            out = task_linear(x.reshape(T, math.prod(x.shape[:-1]) // T, x.shape[-1]), b)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if not _per_task(w, 2) and not _per_task(b, 1):
            return F.linear(x, w, b)
        T = _tasks_of(self, x.shape[0])
        w = w if _per_task(w, 2) else w.expand(T, *w.shape)
        h = x.reshape(T, math.prod(x.shape[:-1]) // T, x.shape[-1])  # not -1: inputs with 0 features
        out = torch.bmm(h, w.transpose(1, 2))
        if b is not None:
            out = out + (b if _per_task(b, 1) else b.expand(T, -1)).unsqueeze(1)
        return out.reshape(*x.shape[:-1], w.shape[1])


class _TaskTransposedLinear:
    """Hugging Face's Conv1D (GPT-2's linear layers, weight [in, out]) as one batched matmul."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if not _per_task(w, 2) and not _per_task(b, 1):
            return self._mk_original_forward(x)
        T = _tasks_of(self, x.shape[0])
        w = w if _per_task(w, 2) else w.expand(T, *w.shape)
        out = torch.bmm(x.reshape(T, math.prod(x.shape[:-1]) // T, x.shape[-1]), w)
        if b is not None:
            out = out + (b if _per_task(b, 1) else b.expand(T, -1)).unsqueeze(1)
        return out.reshape(*x.shape[:-1], w.shape[2])


def _known_by_name(m: nn.Module):
    """Layers of other libraries known by their class name and shape, without importing them."""
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and set(m._parameters) == {"weight", "bias"}:
        return _TaskTransposedLinear  # transformers.pytorch_utils.Conv1D
    return None


class _TaskEmbedding:
    def forward(self, idx: Tensor) -> Tensor:
        w = self.weight
        if not _per_task(w, 2):
            return F.embedding(idx, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                               self.sparse)
        if self.max_norm is not None:
            raise ValueError(f"{self._mk_name}: Embedding(max_norm=...) renormalises its table in place, which has no "
                             "per-task form; drop max_norm or freeze the embedding")
        T, V = w.shape[0], w.shape[1]
        if idx.dim() >= 1 and idx.shape[0] == 1 and _PASS.batch % T == 0 and _PASS.batch > T:
            # An index with batch 1 broadcast over the samples (a model's position ids buffer): one
            # lookup per task, repeated over that task's samples.
            per_task = w[:, idx[0]]  # [T, *idx, H]
            return per_task.unsqueeze(1).expand(T, _PASS.batch // T, *per_task.shape[1:]).reshape(
                _PASS.batch, *per_task.shape[1:])
        offsets = torch.arange(T, device=idx.device).repeat_interleave(idx.shape[0] // T) * V
        shifted = idx + offsets.reshape(-1, *([1] * (idx.dim() - 1)))
        return F.embedding(shifted, w.reshape(T * V, -1))


class _TaskBatchNorm:
    """Per-task batch statistics through the fused batch_norm op; eval mode (or running statistics
    in use) normalises with the running statistics and applies the per-task affine. A training
    pass folds the T tasks' statistics into the running ones as T successive batches in task order
    (ops.batch_norm.fold_running_stats): what a per-task loop over the same pass leaves."""
    plan = "batched (fused batch_norm op)"

    def batch_stats_only(self) -> bool:
        """Normalises with batch statistics and keeps no running ones in this pass."""
        return self.running_mean is None or (self.training and not self.track_running_stats)

    def uses_running_stats(self) -> bool:
        """Normalises with the running statistics in this pass (eval mode, as torch)."""
        return not self.training and self.running_mean is not None

    def pass_affine(self):
        """(weight, bias) of this pass: each [T, C] per task or [C] shared."""
        return self.weight, self.bias

    def running_update(self, x: Tensor, T: int):
        """(whether this pass updates the running statistics, its momentum: one value or one per
        task); counts the T batches as torch counts one."""
        # Inside a torch.func transform (the torch_func engine's inner gradients) the running
        # statistics, captured buffers, cannot be updated in place: those passes leave them alone.
        if not (self.training and self.track_running_stats and self.running_mean is not None) or \
                torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False, 0.0
        momentum = self.momentum
        if self.num_batches_tracked is not None:
            seen = int(self.num_batches_tracked)
            self.num_batches_tracked.add_(T)
            if momentum is None:  # cumulative moving average, as torch: 1 / batches seen, batch by batch
                momentum = [1.0 / (seen + t + 1) for t in range(T)]
        return True, 0.0 if momentum is None else momentum

    def forward(self, x: Tensor) -> Tensor:
        T = _tasks_of(self, x.shape[0])
        if not (self.training or self.running_mean is None):
            h = F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
            return _affine(h, self.weight, self.bias, T, channel_dim=1)
        running, momentum = self.running_update(x, T)
        xt = x.reshape(T, x.shape[0] // T, *x.shape[1:])
        if xt.dim() == 3:  # BatchNorm1d on [N, C]: a trailing spatial dim of 1 for the op
            xt = xt.unsqueeze(-1)
        out = ops.batch_norm(xt, self.weight, self.bias, self.eps,
                             running_mean=self.running_mean if running else None,
                             running_var=self.running_var if running else None, momentum=momentum)
        return out.reshape(x.shape)

    def channels_forward(self, h: Tensor, T: int) -> Tensor:
        """This batch norm on activations laid out [N, T*C, *s] (tasks side by side in the channels)."""
        w, b = self.pass_affine()
        gamma, beta = _channels_affine(w, T), _channels_affine(b, T)
        if self.uses_running_stats():
            return F.batch_norm(h, self.running_mean.repeat(T), self.running_var.repeat(T),
                                None if gamma is None else gamma.reshape(-1), None if beta is None else beta.reshape(-1),
                                False, 0.0, self.eps)
        running, momentum = (False, 0.0) if self.batch_stats_only() else self.running_update(h, T)
        out, mean, var = ops.batch_norm(h.unsqueeze(0), gamma, beta, self.eps, return_stats=True)
        if running and mean is not None:  # the statistics of the T*C channels, as T tasks' C each
            fold_running_stats(self.running_mean, self.running_var, mean.reshape(T, -1), var.reshape(T, -1), momentum)
        return out.squeeze(0)


class _TaskStepBatchNorm(_TaskBatchNorm):
    """StepBatchNorm (Conv4's): the affine row of the current inner step; per-task batch
    statistics (bn_mode transductive / per_step) or the running statistics of that row (frozen);
    update_stats folds this pass's per-task statistics, averaged over tasks, into the row first."""

    def pass_affine(self):
        w, b = self.weight, self.bias
        if self._mk_base_dims["weight"] == 2:  # a row per step: [steps, C], [T, steps, C] per task
            row = min(_PASS.step, w.shape[-2] - 1)
            w, b = w[..., row, :], b[..., row, :]
        return w, b

    def batch_stats_only(self) -> bool:
        return _PASS.bn_mode != "frozen" and not _PASS.update_stats

    def uses_running_stats(self) -> bool:  # its running rows serve bn_mode 'frozen' only (forward)
        return False

    def forward(self, x: Tensor) -> Tensor:
        T = _tasks_of(self, x.shape[0])
        row = min(_PASS.step, self.running_mean.shape[0] - 1)
        if _PASS.update_stats:
            with torch.no_grad():
                v = x.detach().reshape(T, x.shape[0] // T, x.shape[1], -1)
                mean, var = v.mean(dim=(1, 3)), v.var(dim=(1, 3), unbiased=v.shape[1] * v.shape[3] > 1)
                self.running_mean[row].mul_(1 - self.momentum).add_(mean.mean(0), alpha=self.momentum)
                self.running_var[row].mul_(1 - self.momentum).add_(var.mean(0), alpha=self.momentum)
        w, b = self.pass_affine()
        if _PASS.bn_mode == "frozen":
            shape = (1, -1) + (1,) * (x.dim() - 2)
            h = (x - self.running_mean[row].view(shape)) * torch.rsqrt(self.running_var[row] + self.eps).view(shape)
            return _affine(h, w, b, T, channel_dim=1)
        out = ops.batch_norm(x.reshape(T, x.shape[0] // T, *x.shape[1:]), w, b, self.eps)
        return out.reshape(x.shape)


class _TaskLayerNorm:
    def forward(self, x: Tensor) -> Tensor:
        if not _per_task(self.weight, len(self.normalized_shape)) and not _per_task(self.bias, len(self.normalized_shape)):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        T = _tasks_of(self, x.shape[0])
        h = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        k = len(self.normalized_shape)
        ht = h.reshape(T, -1, *h.shape[1:])
        lead = ht.dim() - 1 - k  # dims between the task dim and the normalised ones
        for v, op in ((self.weight, torch.mul), (self.bias, torch.add)):
            if v is not None:
                v = v if _per_task(v, k) else v.expand(T, *v.shape)
                ht = op(ht, v.reshape(T, *([1] * lead), *v.shape[1:]))
        return ht.reshape(h.shape)


class _TaskGroupNorm:
    def forward(self, x: Tensor) -> Tensor:
        if not _per_task(self.weight, 1) and not _per_task(self.bias, 1):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        T = _tasks_of(self, x.shape[0])
        return _affine(F.group_norm(x, self.num_groups, None, None, self.eps), self.weight, self.bias, T, channel_dim=1)


def _affine(h: Tensor, weight: Tensor | None, bias: Tensor | None, T: int, channel_dim: int) -> Tensor:
    """h * weight + bias with a per-channel affine that may be per task ([T, C]) or shared ([C])."""
    ht = h.reshape(T, -1, *h.shape[1:])
    after = ht.dim() - 2 - channel_dim
    for v, op in ((weight, torch.mul), (bias, torch.add)):
        if v is not None:
            v = v if v.dim() == 2 else v.expand(T, -1)
            ht = op(ht, _task_view(v, T, after))
    return ht.reshape(h.shape)


# Layers that act per channel or per element, so they run on activations laid out [N, T*C, *s]
# as they do on [T*N, C, *s].
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.MaxPool1d,
                nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                nn.Dropout1d, nn.Dropout2d)


def _is_pool2x2(m: nn.Module) -> bool:
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    return (type(m) is nn.MaxPool2d and pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


def _relu_pool(mods: list, i: int) -> int:
    """How many modules from i form relu + 2x2 max-pool (either order; they commute): 2 or 0."""
    pair = mods[i:i + 2]
    if len(pair) == 2 and {type(pair[0]), type(pair[1])} == {nn.ReLU, nn.MaxPool2d} and \
            all(type(m) is nn.ReLU or _is_pool2x2(m) for m in pair):
        return 2
    return 0


class _TaskSequential:
    """nn.Sequential (or a module whose forward chains its children, see _chain) whose runs of
    convs, batch norms and channel-wise layers keep the tasks side by side in the channels
    ([N, T*C, *s]) instead of converting at every conv, and run the fused ops
    where their pattern occurs: conv 3x3 -> BN -> ReLU -> 2x2 max-pool of an input layer as
    conv3x3_bn_pool_relu, BN or ReLU followed by the pool as max_pool2x2_relu."""

    def forward(self, *args, **kwargs):
        (x,) = (*args, *kwargs.values())  # a chain's forward takes one input, by position or by name
        mods = [m for _, m in _flat_sequential(self)]
        h, T, i = x, None, 0  # T is set while h is laid out [N, T*C, *s]
        while i < len(mods):
            m = mods[i]
            if isinstance(m, _TaskConv) and isinstance(x, Tensor) and _per_task(m.weight, m._mk_base_dims["weight"]):
                if T is None:
                    T = m.weight.shape[0]
                    m.check_channels(h.shape[1])
                    h = _to_channels(h, T)
                step = _fused_input_block(mods, i, h, T, x)
                if step:
                    h, i = step
                    continue
                b = m.bias
                if b is not None and not _per_task(b, 1):
                    b = b.expand(T, *b.shape)
                h = m.channels_forward(h, m.weight, b, T)
            elif T is not None and isinstance(m, _TaskBatchNorm) and h.dim() == 4 and \
                    (m.batch_stats_only() or not isinstance(m, _TaskStepBatchNorm)):
                h = m.channels_forward(h, T)
                if _relu_pool(mods, i + 1):
                    _check_poolable(h, mods[i + 1], x)
                    h, i = ops.max_pool2x2_relu(h), i + 2
            elif T is not None and _relu_pool(mods, i):
                _check_poolable(h, mods[i], x)
                h, i = ops.max_pool2x2_relu(h), i + 1
            elif T is not None and isinstance(m, _CHANNELWISE):
                h = m(h)
            else:
                if T is not None:
                    h, T = _to_folded(h, T), None
                h = m(h)
            i += 1
        return h if T is None else _to_folded(h, T)


def _is_sequential(m: nn.Module) -> bool:
    """An nn.Sequential, or a subclass that keeps its forward (Conv4): children run in order."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class _ChildrenAsLeaves(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


_CHAINS: "weakref.WeakKeyDictionary[nn.Module, list[str] | None]" = weakref.WeakKeyDictionary()


def _chain(m: nn.Module) -> list[str] | None:
    """The names of the children that m's forward runs one after the other, each on the previous
    one's output, or None when its forward does anything else. A Sequential's children in order;
    a container of the user's own class (learn2learn's ConvBlock: conv -> normalize -> relu) from
    its forward traced once by torch.fx, every child a leaf, nothing run."""
    if _is_sequential(m):
        return list(m._modules)
    if not m._modules or _has_own_params(m) or type(m).forward is nn.Module.forward:
        return None
    if m in _CHAINS:
        return _CHAINS[m]
    names = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ChildrenAsLeaves().trace(m)
        nodes = list(graph.nodes)
        first, calls, last = nodes[0], nodes[1:-1], nodes[-1]
        previous = first
        for node in calls:
            if node.op != "call_module" or node.args != (previous,) or node.kwargs or node.target not in m._modules:
                break
            previous = node
        else:
            if first.op == "placeholder" and calls and last.op == "output" and last.args == (previous,):
                names = [node.target for node in calls]
    except Exception:  # noqa: BLE001 - not traceable (control flow on values, ...): not a chain
        names = None
    _CHAINS[m] = names
    return names


def _flat_sequential(seq: nn.Module, name: str = "") -> list[tuple[str, nn.Module]]:
    """(full name, module) of a chain's children (a Sequential's, or see _chain) in the order they
    run, nested chains opened up, so that the tasks stay side by side in the channels across them."""
    out = []
    view = isinstance(seq, _TaskSequential)  # a view's chains are views already: no tracing on the forward path
    for child_name in (seq._mk_chain if view else _chain(seq)):
        m = seq._modules[child_name]
        full = f"{name}.{child_name}" if name else child_name
        opens = m is not None and (isinstance(m, _TaskSequential) if view else _chain(m) is not None)
        out += _flat_sequential(m, full) if opens else [(full, m)]
    return out


def _channels_affine(v: Tensor | None, T: int) -> Tensor | None:
    """A BN affine ([T, C] per task or [C] shared) as [1, T*C] for activations [N, T*C, *s]."""
    if v is None:
        return None
    return (v if v.dim() == 2 else v.expand(T, -1)).reshape(1, -1)


def _check_poolable(h: Tensor, layer, x: Tensor) -> None:
    """A 2x2 max-pool needs feature maps of at least 2x2: say so in terms of the images, not of the
    fused op's internal layout."""
    if h.dim() == 4 and (h.shape[-2] < 2 or h.shape[-1] < 2):
        name = getattr(layer, "_mk_name", type(layer).__name__)
        raise ValueError(f"layer {name}: its 2x2 pooling gets {h.shape[-2]}x{h.shape[-1]} feature maps, too small to pool: "
                         f"the inputs' {x.shape[-2]}x{x.shape[-1]} images are too small for this model (Conv4's four "
                         f"2x2 poolings need at least 16x16); resize the images to the size the model was built for (Conv4's image_size) "
                         "or build it for theirs")


def _fused_input_block(mods: list, i: int, h: Tensor, T: int, x: Tensor | None = None):
    """conv 3x3 (padding 1) -> BN (batch statistics) -> ReLU and 2x2 max-pool, on an input layer of
    1-4 channels per task, as the one conv3x3_bn_pool_relu op: (output, index after the block), or
    None when the pattern or the backend does not fit."""
    conv, bn = mods[i], mods[i + 1] if i + 1 < len(mods) else None
    if not (conv._mk_plain_3x3 and conv.padding_mode == "zeros" and isinstance(bn, _TaskBatchNorm)
            and bn.batch_stats_only() and _relu_pool(mods, i + 2) and h.dim() == 4
            and conv.weight.shape[-3] <= MAX_FUSED_IN_CHANNELS
            and ops.has_conv3x3_bn_pool_relu(h.device)):
        return None
    w, b = conv.weight, conv.bias
    if b is not None and not _per_task(b, 1):
        b = b.expand(T, *b.shape)
    if x is not None:
        _check_poolable(h, next(m for m in mods[i + 2:i + 4] if type(m) is not nn.ReLU), x)
    bn_weight, bn_bias = bn.pass_affine()
    gamma = _channels_affine(bn_weight, T)
    gamma = h.new_ones(w.shape[0] * w.shape[1]) if gamma is None else gamma.reshape(-1)
    beta = _channels_affine(bn_bias, T)
    beta = h.new_zeros(gamma.shape) if beta is None else beta.reshape(-1)
    out = ops.conv3x3_bn_pool_relu(h, w.reshape(T * w.shape[1], *w.shape[2:]), None if b is None else b.reshape(-1),
                                   gamma, beta, groups=T, eps=bn.eps)
    return out, i + 4


# Known layers: torch class -> task-aware forward. Subclasses of these keep the user's own class
# (their forward may differ) and go through the fallback.
KNOWN = {nn.Conv1d: _TaskConv, nn.Conv2d: _TaskConv, nn.Linear: _TaskLinear, nn.Embedding: _TaskEmbedding,
         nn.BatchNorm1d: _TaskBatchNorm, nn.BatchNorm2d: _TaskBatchNorm, nn.BatchNorm3d: _TaskBatchNorm,
         StepBatchNorm: _TaskStepBatchNorm,
         nn.LayerNorm: _TaskLayerNorm, nn.GroupNorm: _TaskGroupNorm}


# ---- the fallback for unknown layers ---------------------------------------------------------

class _Fallback:
    """An unknown module with parameters: torch.func.vmap over the tasks for this module alone
    (each task's samples and parameters), else a per-task loop for this module alone."""

    def forward(self, *args, **kwargs):
        # Inside functional_call these are the swapped-in values: stacked per task or shared.
        own = dict(self.named_parameters())
        stacked = {n: p for n, p in own.items() if _per_task(p, self._mk_base_dims[n])}
        shared = {n: p for n, p in own.items() if n not in stacked}
        batch = next(a.shape[0] for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor))
        T = next(iter(stacked.values())).shape[0] if stacked else 1
        if batch % T:
            raise ValueError(f"{self._mk_name}: a batch of {batch} samples does not split into {T} tasks")
        # Tensors with the folded batch dim go per task; any other argument (a mask, a size) is shared.
        per_sample = lambda v: isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch
        split = lambda v: v.reshape(T, batch // T, *v.shape[1:]) if per_sample(v) else v
        args_t, kwargs_t = pytree.tree_map(split, (args, kwargs))
        original = self._mk_original

        def task_inputs(t: int):
            return pytree.tree_map(lambda v: split(v)[t] if per_sample(v) else v, (args, kwargs))

        def one_task(p, a, kw):
            return functional_call(original, {**p, **shared}, a, kw, strict=False)

        def tensors_only(p, a, kw):  # vmap returns tensors only: other outputs (None) are kept aside
            leaves, spec = pytree.tree_flatten(one_task(p, a, kw))
            kept.update(spec=spec, others={i: v for i, v in enumerate(leaves) if not isinstance(v, Tensor)})
            return tuple(v for v in leaves if isinstance(v, Tensor))

        kept: dict = {}

        if self._mk_mode[0] == "vmap":
            in_dims = (0, *pytree.tree_map(lambda v: 0 if per_sample(v) else None, (args, kwargs)))
            try:
                tensors = iter(torch.func.vmap(tensors_only, in_dims=in_dims, randomness="different")(
                    stacked, args_t, kwargs_t))
                leaves = [kept["others"][i] if i in kept["others"] else fold(next(tensors), T)
                          for i in range(kept["spec"].num_leaves)]
                return pytree.tree_unflatten(leaves, kept["spec"])
            except Exception as exc:  # noqa: BLE001 - any vmap failure: this module runs in a loop instead
                self._mk_mode[0] = "loop"
                warnings.warn(f"meta_kernels: layer {self._mk_name} ({type(original).__name__}) cannot run under vmap "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it runs its tasks in a loop "
                              "(the rest of the model stays batched)", stacklevel=2)
        try:
            outs = [one_task({n: p[t] for n, p in stacked.items()}, *task_inputs(t)) for t in range(T)]
        except Exception as exc:
            raise RuntimeError(f"meta_kernels: layer {self._mk_name} ({type(original).__name__}) can be neither batched "
                               f"nor vmapped nor run per task: {type(exc).__name__}: {exc}") from exc
        return fold(stack_structures(outs), T)


def stack_structures(outs: list):
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.stack(outs)
    if isinstance(first, (tuple, list)):
        return type(first)(stack_structures([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: stack_structures([o[k] for o in outs]) for k in first}
    return first


# ---- the view --------------------------------------------------------------------------------

@dataclass
class LayerPlan:
    name: str
    kind: str
    how: str  # "batched", "fused op <name>", "vmap", "loop", "as is (no parameters)"

    def __str__(self) -> str:
        return f"{self.name or '(model)'}: {self.kind} -> {self.how}"


_VIEW_CLASSES: dict[tuple[type, type], type] = {}


def _view_class(base: type, behaviour: type) -> type:
    key = (base, behaviour)
    if key not in _VIEW_CLASSES:  # the original forward stays at hand for passes with shared weights
        namespace = {"_mk_original_forward": base.forward}
        if behaviour is not _TaskSequential:
            namespace["__getattr__"] = _watched_getattr
        _VIEW_CLASSES[key] = type(f"TaskBatched{base.__name__}", (behaviour, base), namespace)
    return _VIEW_CLASSES[key]


class DirectWeightRead(ValueError):
    """The model's own code read a layer's weight, which is per task here ([T, *shape]), and the
    pass failed: that code expects the layer's own weight shape."""


def _watched_getattr(self, name: str):
    """nn.Module's attribute lookup, which also notes the model's own code reading a per-task
    weight of this layer (`x @ self.head.weight.t()`, or only its dtype); if the pass then fails,
    such a read is the likely cause (BatchedModel). The engine's code and torch's own (the layer's
    forward, F.*) read it as they should."""
    value = nn.Module.__getattr__(self, name)
    if isinstance(value, Tensor) and name in self._parameters and _per_task(value, self._mk_base_dims.get(name, -1)) \
            and not torch.compiler.is_compiling():
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not caller.startswith(("meta_kernels.", "torch.")):
            _PASS.direct_reads.append(f"{self._mk_name}.{name}")
    return value


def _has_own_params(m: nn.Module) -> bool:
    return any(p is not None for p in m._parameters.values())


def _is_plain_3x3(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1)


_BN2D = (nn.BatchNorm2d, StepBatchNorm)


def _sequential_plans(seq: nn.Sequential, name: str) -> dict[str, str]:
    """How the fused patterns of a Sequential run (see _TaskSequential), by child name."""
    flat = _flat_sequential(seq, name)
    names, mods = [n for n, _ in flat], [m for _, m in flat]
    full = lambda k: names[k]
    plans, i = {}, 0
    while i < len(mods):
        m = mods[i]
        if _is_plain_3x3(m) and m.in_channels <= MAX_FUSED_IN_CHANNELS and i + 1 < len(mods) and \
                type(mods[i + 1]) in _BN2D and _relu_pool(mods, i + 2):
            for k in range(i, i + 4):
                plans[full(k)] = "fused op conv3x3_bn_pool_relu (on the cpp / reference backends; else composed ops)"
            i += 4
            continue
        if type(m) in _BN2D and _relu_pool(mods, i + 1):
            plans[full(i)] = "fused op batch_norm"
            plans[full(i + 1)] = plans[full(i + 2)] = "fused op max_pool2x2_relu"
            i += 3
            continue
        if _relu_pool(mods, i):
            plans[full(i)] = plans[full(i + 1)] = "fused op max_pool2x2_relu"
            i += 2
            continue
        i += 1
    return plans


def build_view(model: nn.Module) -> tuple[nn.Module, list[LayerPlan], list[tuple[nn.Module, nn.Module]]]:
    """A task-batched view of `model`: containers are shallow copies holding views of their
    children; known layers get task-aware classes; unknown layers with parameters get the
    fallback. Parameters and buffers are the original objects (running statistics stay shared); a
    module registered under two names gets one view, so that swapping its tensors by either name
    (functional_call) reaches the one the forward runs."""
    plans: list[LayerPlan] = []
    pairs: list[tuple[nn.Module, nn.Module]] = []
    fused: dict[str, str] = {}
    views: dict[int, nn.Module] = {}

    def visit(m: nn.Module, name: str) -> nn.Module:
        if id(m) in views:
            return views[id(m)]
        view = views[id(m)] = copy.copy(m)
        view._parameters = dict(m._parameters)
        view._buffers = m._buffers  # the same dict: running statistics are the model's own
        view._modules = dict(m._modules)  # known and fallback layers run their children as the original
        view._mk_name = name or type(m).__name__
        view._mk_base_dims = {n: p.dim() for n, p in m.named_parameters()}
        view._mk_plain_3x3 = _is_plain_3x3(m)
        pairs.append((view, m))
        behaviour = KNOWN.get(type(m)) or _known_by_name(m)
        if behaviour is not None:
            view.__class__ = _view_class(type(m), behaviour)
            how = getattr(behaviour, "plan", "batched")
            plans.append(LayerPlan(name, type(m).__name__, fused.get(name, how)))
        elif _has_own_params(m):
            view.__class__ = _view_class(type(m), _Fallback)
            object.__setattr__(view, "_mk_original", m)  # not a submodule: its parameters are the view's
            view._mk_mode = ["vmap"]
            plans.append(LayerPlan(name, type(m).__name__, "vmap over tasks (this layer only)"))
        else:  # a container or a layer without parameters
            chain = _chain(m)
            if chain is not None:  # a Sequential, or a forward that chains its children
                view.__class__ = _view_class(type(m), _TaskSequential)
                view._mk_chain = chain
                fused.update(_sequential_plans(m, name))
            if not m._modules:
                plans.append(LayerPlan(name, type(m).__name__, fused.get(name, "as is (runs on the folded batch)")))
            for child_name, child in m._modules.items():
                view._modules[child_name] = None if child is None else visit(child, f"{name}.{child_name}" if name else child_name)
        return view

    return visit(model, ""), plans, pairs


class ModelForwardError(RuntimeError):
    """The model's forward failed on a task batch's inputs; the message says what it met."""

    @classmethod
    def of(cls, model: nn.Module, inputs, exc: RuntimeError) -> RuntimeError:
        """exc itself when already said; else torch's wording ("batch2 tensor", "mat1 and mat2")
        with the inputs' shapes and what to check."""
        if isinstance(exc, cls):
            return exc
        shapes = []
        map_structure(lambda t: shapes.append((list(t.shape), str(t.dtype).removeprefix("torch."))) or t, inputs)
        first = str(exc).splitlines()[0][:300].rstrip(".")
        hint = ""
        if any(not d.startswith(("float", "bfloat", "complex")) for _, d in shapes) and "expected" in first.lower():
            hint = " The inputs are integers: images must be floating point (e.g. x.float() / 255)."
        described = "; ".join(f"{s} {d}" for s, d in shapes)
        sample = shapes[0][0][2:] if shapes else []
        return cls(f"{type(model).__name__}'s forward failed on the task batch's inputs ({described}: [T, N, ...], one "
                   f"sample {sample}): {first}.{hint} Check that one sample has the shape the model's first layer "
                   "takes, and that support and query inputs share it.")


class BatchedModel:
    """Runs `model` for T tasks at once: `self(params, args, kwargs)` with every
    parameter [T, *shape] (or shared [*shape]) and every input tensor [T, N, ...]; outputs
    come back as [T, N, ...]."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.view, self.plans, self._pairs = build_view(model)
        self._places = _tensor_places(self.view)
        names = {id(view): name for name, view in self.view.named_modules(remove_duplicate=False)}
        self._fallbacks = {names.get(id(v), ""): v for v, _ in self._pairs if isinstance(v, _Fallback)}

    def _run(self, params: dict[str, Tensor], args: tuple, kwargs: dict):
        """The view's forward with `params` (parameters or buffers, by name) in their places,
        restored after. Every place of a tensor is set, so tied weights stay tied; each place is
        saved once, so a module registered under two names gets its own tensors back (torch's
        functional_call restores such a module to the swapped-in tensor)."""
        saved = {}
        try:
            for name, value in params.items():
                for store, key in self._places.get(name, ()):
                    saved.setdefault((id(store), key), (store, key, store[key]))
                    store[key] = value
            return self.view(*args, **kwargs)
        finally:
            for store, key, old in saved.values():
                store[key] = old

    def __call__(self, params: dict[str, Tensor], args: tuple, kwargs: dict | None = None, *,
                 double_backward: bool = False, step: int = 0, bn_mode: str = "transductive",
                 update_stats: bool = False):
        """`double_backward` marks a pass whose gradient is differentiated again (MAML's inner
        steps): convs then take a grouped double backward without aten's per-group loop.
        step / bn_mode / update_stats reach StepBatchNorm layers (MAML++)."""
        kwargs = kwargs or {}
        T = _task_count(args, kwargs)
        for view, original in self._pairs:  # train / eval as the model is now
            view.training = original.training
        _PASS.double_backward, _PASS.step, _PASS.bn_mode, _PASS.update_stats = \
            double_backward, step, bn_mode, update_stats
        _PASS.batch = T * _lead_samples(args, kwargs)
        _PASS.direct_reads = []
        try:
            with engine_pass(double_backward):
                out = self._run(params, fold(args, T), fold(kwargs, T))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if _PASS.direct_reads:  # the model's code met a per-task weight it read itself
                raise DirectWeightRead(", ".join(dict.fromkeys(_PASS.direct_reads))) from exc
            if isinstance(exc, RuntimeError):
                raise ModelForwardError.of(self.model, (args, kwargs), exc) from exc
            raise
        finally:
            _PASS.double_backward, _PASS.step, _PASS.bn_mode, _PASS.update_stats = False, 0, "transductive", False
            _PASS.batch = 0
        return unfold(out, T)

    def has_step_batch_norm(self) -> bool:
        return any(isinstance(m, StepBatchNorm) for _, m in self._pairs)

    def one_task(self, params: dict[str, Tensor], args: tuple, kwargs: dict | None = None):
        """The model's forward for a single task, inputs and outputs as the model takes and gives
        them: `params` hold each weight as [1, *shape] (task-aware on the fused ops) or [*shape]."""
        for view, original in self._pairs:
            view.training = original.training
        with engine_pass(torch.is_grad_enabled()):
            return self._run(params, args, kwargs or {})

    def explain(self) -> list[LayerPlan]:
        """Each layer's plan, with what its fallback does now (vmap, or a loop once vmap failed)."""
        plans = []
        for plan in self.plans:
            view = self._fallbacks.get(plan.name)
            if view is not None and view._mk_mode[0] == "loop":
                plan = LayerPlan(plan.name, plan.kind, "loop over tasks (this layer only: vmap cannot run it)")
            plans.append(plan)
        return plans


@contextlib.contextmanager
def engine_pass(double_backward: bool):
    """What every pass of a model with adapted weights runs under: torch's fused inference path
    for attention off (its kernels read a module's weights as 2-D), and, when the pass is
    differentiated twice (MAML's inner steps), the math kernel of scaled_dot_product_attention
    (the fused kernels have no double backward) -- the user sets nothing."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH) if double_backward else contextlib.nullcontext():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _tensor_places(view: nn.Module) -> dict[str, list[tuple[dict, str]]]:
    """For every parameter and buffer name of the view (tied and repeated names included): the
    (dict, key) places that hold its tensor, those of every name of the same tensor included."""
    by_tensor: dict[int, list[tuple[dict, str]]] = {}
    names: dict[str, int] = {}
    for prefix, m in view.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                places = by_tensor.setdefault(id(t), [])
                if not any(s is store and k == key for s, k in places):
                    places.append((store, key))
                names[f"{prefix}.{key}" if prefix else key] = id(t)
    return {name: by_tensor[tid] for name, tid in names.items()}


def _lead_samples(args, kwargs) -> int:
    """N, the samples per task of the first input tensor [T, N, ...]."""
    t = next((v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, Tensor)), None)
    return t.shape[1] if t is not None and t.dim() >= 2 else 1


def _task_count(args, kwargs) -> int:
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, Tensor):
            return t.shape[0]
        if isinstance(t, (tuple, list, dict)):
            inner = list(t.values()) if isinstance(t, dict) else list(t)
            if inner:
                return _task_count(inner, {})
    raise ValueError("the model's inputs hold no tensor; pass inputs of shape [T, N, ...]")


class TaskMixingError(ValueError):
    """The model's forward mixes samples across the batch outside the layers the engine knows."""


def check_task_independence(model: nn.Module, inputs, params: dict[str, Tensor] | None = None, *,
                            atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raises TaskMixingError when the batched forward of `inputs` ([T, N, ...] tensors, T >= 2)
    gives task 0 other outputs than task 0 run alone -- the sign of a forward that mixes samples
    outside the known layers (`x.mean(0)`, a hand-written batch norm). Both passes run in eval mode
    without a graph (MetaLearner runs this on its first step with two tasks; debug_batching=False
    skips it)."""
    from meta_kernels.meta.task_model import model_inputs  # the same input forms as the inner loop
    args, kwargs = model_inputs(inputs)
    T = _task_count(args, kwargs)
    if T < 2:
        raise ValueError("check_task_independence needs at least 2 tasks in the inputs")
    engine = BatchedModel(model)
    base = dict(model.named_parameters()) if params is None else params
    stacked = {k: v if v.dim() > dict(model.named_parameters())[k].dim() else v.expand(T, *v.shape)
               for k, v in base.items()}
    first = lambda tree: pytree.tree_map(lambda v: v[:1] if isinstance(v, Tensor) else v, tree)
    # In eval mode: dropout off, so that the two passes draw nothing at random (the known layers
    # keep tasks apart in either mode; the check is for the model's own code).
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            try:
                together = engine(stacked, args, kwargs)
            except DirectWeightRead:  # such a model runs its tasks in a loop (TaskModel), which mixes nothing
                return
            alone = engine(first(stacked), first(args), first(kwargs))
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    for a, b in zip(pytree.tree_leaves(first(together)), pytree.tree_leaves(alone)):
        if isinstance(a, Tensor) and not torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
            raise TaskMixingError(
                f"{type(model).__name__}'s forward mixes samples across the batch outside the layers the engine knows "
                f"(task 0 differs by {(a - b).abs().max().item():.3e} when run with other tasks): the tasks are folded into "
                "one batch, so an operation over the batch dim (x.mean(0), a hand-written norm over samples) sees "
                "every task. Write it as a module the engine knows (nn.BatchNorm*), or run this model with "
                "task_batching='loop'")


# The recurrent and attention layers live in their own module; it imports the helpers above.
from meta_kernels.meta.sequence_layers import SEQUENCE_LAYERS  # noqa: E402

KNOWN.update(SEQUENCE_LAYERS)
