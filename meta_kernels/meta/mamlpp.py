"""MAML++ pieces (Antoniou et al. 2019, "How to train your MAML"): learned per-layer-per-step
inner rates (LSLR) and multi-step loss (MSL) weights."""
from __future__ import annotations

import torch
from torch import Tensor

LSLR_MIN, LSLR_MAX = 1e-6, 1.0
MSL_FLOOR = 0.03  # the paper's floor for non-final weights, times 1/steps


def msl_weights(kind: str, steps: int, epoch: int = 0, *, logits: Tensor | None = None,
                decay_epochs: int = 10) -> Tensor:
    """Weights of the query losses after 1..steps inner updates (positive, summing to 1).

    uniform: the paper's schedule -- 1/steps each at epoch 0, the non-final weights decaying
    linearly to 0.03/steps over `decay_epochs` while the last weight takes what they lose;
    linear_increase: proportional to the step number; learned: softmax of `logits`."""
    if kind == "learned":
        if logits is None or tuple(logits.shape) != (steps,):
            raise ValueError(f"learned MSL weights need logits of shape [{steps}]")
        return torch.softmax(logits, dim=0)
    if kind == "linear_increase":
        w = torch.arange(1, steps + 1, dtype=torch.float32)
        return w / w.sum()
    if kind != "uniform":
        raise ValueError(f"unknown msl_weights {kind!r}; choose uniform, linear_increase or learned")
    if steps == 1:
        return torch.ones(1)
    decay = 1.0 / steps / max(decay_epochs, 1)
    floor = MSL_FLOOR / steps
    w = torch.full((steps,), max(1.0 / steps - epoch * decay, floor))
    w[-1] = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w
