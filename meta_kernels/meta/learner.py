"""What the trainer uses of a learner, sharded or not: an outer step, evaluation (written once,
here, over each learner's `evaluate_tasks`), and the state a checkpoint holds."""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from meta_kernels import distributed
from meta_kernels.config import MAMLConfig


def auac(curve_accuracy: list[float]) -> float:
    """Area under the accuracy-vs-step curve (trapezoid), normalised to [0, 1] by the number of steps."""
    if len(curve_accuracy) < 2:
        return curve_accuracy[0] if curve_accuracy else math.nan
    area = sum((a + b) / 2 for a, b in zip(curve_accuracy[:-1], curve_accuracy[1:]))
    return area / (len(curve_accuracy) - 1)


@dataclass
class TaskScores:
    """A batch of tasks, each adapted on its support set and scored on its query set."""
    curve_accuracy: Tensor  # [T, steps + 1] query accuracy after 0..steps inner updates
    query_loss: Tensor  # [T] query loss after the last update


class Learner(abc.ABC):
    """The interface of MetaLearner and ShardedMetaLearner."""
    model: nn.Module
    config: MAMLConfig
    optimizer: torch.optim.Optimizer
    outer_steps: int
    # True where evaluate and model_state_dict are collectives that every rank enters (FSDP);
    # False where each rank holds the whole model, so rank 0 alone may call them.
    collective: bool = False

    @abc.abstractmethod
    def step(self, task_batch, *, epoch: int = 0, total_tasks: int | None = None) -> dict[str, float]:
        """One outer step; returns metrics averaged over the meta-batch's tasks."""

    @abc.abstractmethod
    def evaluate_tasks(self, task_batch) -> TaskScores:
        """Adapts every task of the batch from the current weights, which it leaves unchanged."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """The learner's own state (optimiser, counters, learned inner-loop parameters)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def task_share(self) -> tuple[int, int]:
        """(part, parts): this process samples part `part` of `parts` equal parts of each meta-batch."""
        return distributed.world()

    def evaluate(self, task_batches) -> dict:
        """The evaluation record over all tasks of `task_batches`: mean accuracy after adaptation
        with its 95% confidence interval, the adaptation curve (accuracy after 0..K steps,
        averaged over tasks) with AUAC, and the mean query loss."""
        scores = [self.evaluate_tasks(batch) for batch in task_batches]
        curves = torch.cat([s.curve_accuracy for s in scores]).double()
        acc = curves[:, -1]
        curve = curves.mean(0).tolist()
        ci = 1.96 * float(acc.std(unbiased=True)) / math.sqrt(len(acc)) if len(acc) > 1 else math.nan
        return {"accuracy": float(acc.mean()), "ci95": ci, "episodes": len(acc), "curve_accuracy": curve,
                "pre_adapt_acc": curve[0], "post_adapt_acc": curve[-1], "auac": auac(curve),
                "query_loss": float(torch.cat([s.query_loss for s in scores]).mean())}

    def inner_lrs(self):
        """The inner rates used now."""
        return self.config.inner_lr

    def current_msl_weights(self, epoch: int) -> Tensor | None:
        """The multi-step loss weights at `epoch` (None without the multi-step loss)."""
        return None

    # The full (unsharded) weights, for checkpoints.
    def model_state_dict(self) -> dict:
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
