"""learn2learn.nn's small modules that example models are built from: Lambda, Flatten, Scale."""
from __future__ import annotations

import torch
from torch import nn


class Lambda(nn.Module):
    """A module whose forward is the function given: Lambda(lambda x: x.mean(dim=[2, 3]))."""

    def __init__(self, lmb):
        super().__init__()
        if not callable(lmb):
            raise TypeError(f"Lambda takes a callable, got {type(lmb).__name__}")
        self.lmb = lmb

    def forward(self, *args, **kwargs):
        return self.lmb(*args, **kwargs)


class Flatten(nn.Module):
    """x.view(x.size(0), -1): every dim after the first flattened into one."""

    def forward(self, x):
        return x.view(x.size(0), -1)


class Scale(nn.Module):
    """x * alpha with a learnable alpha of the given shape (int or tuple; default (1,)),
    initialised to the value `alpha`."""

    def __init__(self, shape=None, alpha: float = 1.0):
        super().__init__()
        shape = (1,) if shape is None else (shape,) if isinstance(shape, int) else tuple(shape)
        self.alpha = nn.Parameter(torch.ones(*shape) * alpha)

    def forward(self, x):
        return x * self.alpha
