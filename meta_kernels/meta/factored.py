"""Linear weights adapted in factored form: base - gᵀ x, never the [out, in] adapted weight.

An SGD step adds gᵀ x to a Linear weight (x the layer's inputs, g the loss's gradients w.r.t. its
outputs): of rank `samples per step`, far below the weight's on a few-shot task. Held that way
(FactoredWeight), a forward is F.linear(input, base) - (input xᵀ) g, the inner gradient is taken
w.r.t. the layer's outputs, and the meta-loss's backward never forms a weight-sized product per
task either. The core inner loop (meta/inner.py) and the compat learners (meta_kernels.compat)
both hold wide Linear weights this way; `_Placeholder` stands in the weight's places during a
forward so that every other use of the weight sees it formed."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor


class FactoredWeight:
    """A Linear weight after SGD steps, held as base - gᵀ x: x [r, in] the layer's inputs and g
    [r, out] the loss's gradients w.r.t. its outputs (times the rate) of every step so far. That
    is what an SGD step adds to a Linear weight (dloss/dW = gᵀ x), of rank r = samples per step.
    While r is small against the layer, a forward as F.linear(input, base) - (input xᵀ) g skips
    forming the adapted weight, and the inner gradient w.r.t. the layer's outputs skips the weight
    gradient's [out, in] product, in the inner step and again in the meta-loss's backward (a MAML
    step on learn2learn's MLP on 5 samples: about half the time, bench/RESULTS.md). Anything else
    that reads the weight gets it formed (`dense()`, kept), and from then on the layer runs on that.

    For T tasks at once (the batched learners) every part carries the task dim: base [T, out, in]
    (an expand of one shared weight at first: its product stays one GEMM), g [T, r, out], x [T, r,
    in] -- never the T adapted [out, in] weights (the MLP's batched MAML step: 10x faster)."""
    __slots__ = ("base", "g", "x", "dense_")

    def __init__(self, base: Tensor, g: Tensor | None = None, x: Tensor | None = None):
        self.base, self.g, self.x, self.dense_ = base, g, x, None

    @property
    def requires_grad(self) -> bool:
        return self.base.requires_grad or (self.g is not None and self.g.requires_grad)

    @property
    def rank(self) -> int:
        return 0 if self.g is None else self.g.shape[-2]

    def dense(self) -> Tensor:
        if self.dense_ is not None:
            return self.dense_
        # Never `base` itself: the inner gradient w.r.t. the formed weight must count only the
        # uses of the formed weight, not the factored forwards' uses of base.
        if self.g is None:
            dense = self.base.view_as(self.base)
        elif self.base.dim() == 2:
            dense = torch.addmm(self.base, self.g.t(), self.x, alpha=-1)
        else:
            dense = torch.baddbmm(self.base, self.g.transpose(1, 2), self.x, alpha=-1)
        if self.requires_grad and not torch.is_grad_enabled():
            return dense  # formed without a graph (an evaluation under no_grad): later uses need their own
        self.dense_ = dense
        return dense

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x [n, in] -> [n, out]; per task, x [T, n, in] -> [T, n, out] (bias [out] or [T, out])."""
        if self.base.dim() == 2:
            y = F.linear(x, self.base, bias)
            return y if self.g is None else torch.addmm(y, x @ self.x.t(), self.g, alpha=-1)
        shared = self.base.stride(0) == 0
        y = F.linear(x, self.base[0]) if shared else torch.bmm(x, self.base.transpose(1, 2))
        if bias is not None:
            y = y + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
        return y if self.g is None else torch.baddbmm(y, torch.bmm(x, self.x.transpose(1, 2)), self.g, alpha=-1)

    def stepped(self, g: Tensor, x: Tensor) -> "FactoredWeight":
        """This weight minus gᵀ x; formed once the factors would hold more numbers than the weight
        (rank above in * out / (in + out))."""
        new = FactoredWeight(self.base, g if self.g is None else torch.cat([self.g, g], dim=-2),
                             x if self.x is None else torch.cat([self.x, x], dim=-2))
        out_features, in_features = self.base.shape[-2:]
        return new if new.rank <= factored_rank_limit(out_features, in_features) else FactoredWeight(new.dense())


def factored_rank_limit(out_features: int, in_features: int) -> int:
    return out_features * in_features // (out_features + in_features)


_METADATA = {getter for name in ("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout")
             for getter in [getattr(getattr(Tensor, name, None), "__get__", None)] if getter is not None} | \
    {Tensor.size, Tensor.dim, Tensor.numel, Tensor.is_floating_point}


class _Placeholder(Tensor):
    """What a factored weight's places hold during a forward: its base, as a subclass whose ops
    come here (ops on other tensors cost nothing extra). F.linear with it runs factored and records
    (layer input, output) for the inner gradient; any other use gets the formed weight, so every
    use sees the adapted values."""
    _factored: tuple  # (entry index, FactoredWeight, the FastModel's records)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, _Placeholder):
                return _factored_linear(weight, args[0] if args else kwargs["input"],
                                        args[2] if len(args) > 2 else kwargs.get("bias"))
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = pytree.tree_map_only(_Placeholder, lambda a: a._factored[1].dense(), (args, kwargs))
        return func(*args, **kwargs)

    def task_linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The task-batching engine's Linear asks its weight for this (meta/batching.py)."""
        return _factored_linear(self, x, bias)


def placeholder(index: int, factored: FactoredWeight, records: list | None) -> Tensor:
    """What goes into a factored weight's places for a forward: its formed weight once formed,
    else a _Placeholder recording the factored forwards into `records` (None: not recorded)."""
    if factored.dense_ is not None:
        return factored.dense_
    held = factored.base.as_subclass(_Placeholder)
    held._factored = (index, factored, records)
    return held


def _factored_linear(held: _Placeholder, x: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, the factored weight, bias), recording (input, output) for the inner gradient.
    Per task (the engine's Linear): x [T, n, in], bias [out] or [T, out]."""
    index, factored, records = held._factored
    if factored.dense_ is not None:  # formed by another use since: from then on the layer runs on it
        return FactoredWeight(factored.dense_).linear(x, bias)
    lead = x if factored.base.dim() == 3 or x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = factored.linear(lead, bias)
    if records is not None and y.requires_grad:
        records.append((index, lead, y))
    return y if lead is x else y.view(*x.shape[:-1], y.shape[-1])


def entry_grads(entries: Sequence, index: Sequence[int], records: Sequence, loss: Tensor, second_order: bool):
    """The inner gradient of `loss` for the entries at `index` (tensors or FactoredWeights):
    `direct[i]`, dloss/d(entry i) where the loss reads the tensor (or a formed weight), and
    `outer[i]`, the (layer input, dloss/d output) pairs of entry i's factored forwards."""
    targets, owners = [], []
    for i in index:
        w = entries[i]
        if isinstance(w, FactoredWeight):
            w = w.dense_
        if w is not None:
            targets.append(w)
            owners.append((i, None))
    adapted = set(index)
    for i, x, y in records:
        if i in adapted:
            targets.append(y)
            owners.append((i, x))
    grads = torch.autograd.grad(loss, targets, retain_graph=second_order, create_graph=second_order, allow_unused=True)
    direct, outer = {}, {}
    for (i, x), g in zip(owners, grads):
        if g is not None:
            if x is None:
                direct[i] = g
            else:
                outer.setdefault(i, []).append((x if second_order else x.detach(), g))
    return direct, outer


def formed(entries: Sequence) -> list[Tensor]:
    return [e.dense() if isinstance(e, FactoredWeight) else e for e in entries]
