"""A ReLU MLP (the sinusoid regressor of Finn et al. 2017: 1 -> 40 -> 40 -> 1) with a task-batched
forward: T weight sets applied to T input sets by batched matmuls."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(self, sizes=(1, 40, 40, 1)):
        super().__init__()
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes must list >= 2 positive layer widths, got {sizes}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    @staticmethod
    def forward_tasks(params: dict[str, Tensor], x: Tensor, *, step: int = 0, bn_mode: str = "transductive",
                      buffers=None, update_stats: bool = False) -> Tensor:
        """x [T, N, in] -> [T, N, out] with per-task weights [T, out, in] and biases [T, out].
        (No BatchNorm: the step/BN arguments of the task-model protocol do not apply.)"""
        n_layers = len([k for k in params if k.endswith(".weight")])
        for i in range(n_layers):
            x = torch.baddbmm(params[f"layers.{i}.bias"].unsqueeze(1), x, params[f"layers.{i}.weight"].transpose(1, 2))
            if i < n_layers - 1:
                x = F.relu(x)
        return x
