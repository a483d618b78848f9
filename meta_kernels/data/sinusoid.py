"""Sinusoid regression tasks (Finn et al. 2017): y = A sin(x - phase), A ~ U[0.1, 5],
phase ~ U[0, pi], x ~ U[-5, 5]. A meta-batch is a pure function of (seed, step), like episodes."""
from __future__ import annotations

import math

import torch

from meta_kernels.data.episodes import TaskBatch, episode_rng


class SinusoidTasks:
    AMPLITUDE = (0.1, 5.0)
    PHASE = (0.0, math.pi)
    X_RANGE = (-5.0, 5.0)

    def __init__(self, k_shot: int = 10, q_query: int = 10, seed: int = 0):
        if k_shot < 1 or q_query < 1:
            raise ValueError(f"k_shot and q_query must be >= 1, got {k_shot}, {q_query}")
        self.k_shot, self.q_query, self.seed = k_shot, q_query, seed

    def sample(self, epoch: int, step: int, meta_batch_size: int) -> tuple[TaskBatch, torch.Tensor, torch.Tensor]:
        """(TaskBatch with x [T, K or Q, 1] and y [T, K or Q, 1], amplitudes [T], phases [T])."""
        rng = episode_rng(self.seed, epoch, step)
        T, n = meta_batch_size, self.k_shot + self.q_query
        amp = torch.from_numpy(rng.uniform(*self.AMPLITUDE, size=T)).float()
        phase = torch.from_numpy(rng.uniform(*self.PHASE, size=T)).float()
        x = torch.from_numpy(rng.uniform(*self.X_RANGE, size=(T, n, 1))).float()
        y = self.function(amp, phase, x)
        k = self.k_shot
        # TaskBatch.classes has no meaning for regression: it holds the task parameters [T, 2].
        batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], torch.stack([amp, phase], 1))
        return batch, amp, phase

    @staticmethod
    def function(amp: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return amp.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))
