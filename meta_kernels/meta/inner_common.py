"""What the inner-loop engines (inner.py, higher_engine.py) and the algorithms built on them
share: the settings of an inner loop, what it returns, task batches, the per-task loss, the
rate table, and the query pass."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from meta_kernels.config import BN_MODES, ENGINES, MAMLConfig
from meta_kernels.tensor_utils import to_compute

NONFINITE = ("raise", "skip")
LOSSES = ("cross_entropy", "mse")


class NonFiniteLossError(FloatingPointError):
    """The inner loop produced a NaN/inf loss or gradient; the message names the step and tasks."""


@dataclass(frozen=True)
class InnerLoopSettings:
    """How an inner loop runs; built once (from a MAMLConfig with `from_config`, or from `adapt`'s
    arguments) and varied with `replace` (e.g. first order during derivative-order annealing).

    first_order: gradients without create_graph (FOMAML); no_graph: no graph at all, updates in
    place (Reptile, evaluation); recompute: keep only each step's starting weights and rebuild
    the second-order graph one step at a time in the backward (see inner.adapt_tasks).
    bn_mode: 'transductive' (statistics of the current set), 'per_step' (the same, with the BN
    affine row of the current step), 'frozen' (running statistics; BN affine not adapted).
    on_nonfinite: 'raise' on a NaN/inf inner loss, or 'skip' the task (it keeps the base weights)."""
    steps: int
    first_order: bool
    bn_mode: str = "transductive"
    inner_clip: float | None = None
    engine: str = "custom"
    backend: str | None = None  # None: the op backend in effect where the inner loop runs
    no_graph: bool = False
    on_nonfinite: str = "raise"
    loss: str = "cross_entropy"
    recompute: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {self.bn_mode!r}; choose one of {', '.join(BN_MODES)}")
        if self.on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE}, got {self.on_nonfinite!r}")

    @classmethod
    def from_config(cls, config: MAMLConfig, **changes) -> "InnerLoopSettings":
        """The inner loop a MAMLConfig describes (its algorithm's order), with `changes` on top."""
        settings = cls(steps=config.inner_steps, first_order=config.first_order, inner_clip=config.inner_clip,
                       engine=config.engine, backend=config.backend, loss=config.loss,
                       on_nonfinite="skip" if config.skip_nonfinite_tasks else "raise")
        return settings.replace(**changes)

    def replace(self, **changes) -> "InnerLoopSettings":
        return dataclasses.replace(self, **changes)


@dataclass
class StepLog:
    """One inner step, averaged over the tasks that were not skipped (per-task values in *_per_task)."""
    step: int
    loss: float
    accuracy: float
    grad_norm: float
    update_norm: float
    lr_mean: float
    lr_min: float
    lr_max: float
    clip_factor: float = 1.0
    loss_per_task: list[float] = field(default_factory=list)
    # Query loss/accuracy before this step's update (the adaptation curve), when a query set was given.
    query_loss: float | None = None
    query_accuracy: float | None = None


@dataclass
class AdaptResult:
    adapted: dict[str, Tensor]
    logs: list[StepLog]
    # Query loss and accuracy after 0..steps updates, averaged over the tasks not skipped (filled
    # when a query batch was given).
    curve_loss: list[float]
    curve_accuracy: list[float]
    task_ok: Tensor  # [T] bool, False for tasks skipped after a non-finite loss
    msl_loss_per_task: Tensor | None = None  # [T] sum_k w_k query loss after k+1 updates (MSL)
    # recompute=True: back-propagates d(objective)/d(adapted weights) ([T, *shape] per parameter,
    # in order) through the inner loop, rebuilding one step's second-order graph at a time.
    backward: Callable[[list[Tensor]], None] | None = None
    # The same curve per task: [T, steps + 1] (with a query batch).
    curve_loss_per_task: Tensor | None = None
    curve_accuracy_per_task: Tensor | None = None


def batch_parts(task_batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_support, y_support, x_query, y_query) of a TaskBatch or a 4-tuple."""
    if hasattr(task_batch, "x_support"):
        return task_batch.x_support, task_batch.y_support, task_batch.x_query, task_batch.y_query
    if len(task_batch) == 4:
        return tuple(task_batch)
    raise ValueError("task_batch must be a TaskBatch or (x_support, y_support, x_query, y_query)")


def as_task_batch(x: Tensor, y: Tensor, name: str, loss: str = "cross_entropy") -> tuple[Tensor, Tensor]:
    """Adds the task dim to a single classification task; checks shapes and label types.

    cross_entropy: x [T, N, ...], y [T, N] integer classes (or one task: x [N, ...], y [N]).
    mse: x [T, N, ...], y [T, N, ...] float targets."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "cross_entropy" and y.dim() == 1:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if y.dim() < 2 or x.dim() < 2 or x.shape[:2] != y.shape[:2] or (loss == "cross_entropy" and y.dim() != 2):
        want = "y [T, N]" if loss == "cross_entropy" else "y [T, N, ...]"
        raise ValueError(f"{name}: x must be [T, N, ...] and {want}; got x {list(x.shape)} and y {list(y.shape)}")
    if y.shape[1] == 0:
        raise ValueError(f"{name} set is empty: it needs at least one example per task")
    if loss == "cross_entropy" and y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} labels must be integer class indices for cross_entropy, got {y.dtype}")
    return x, y


def _check_labels(y: Tensor, n_out: int, name: str) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_out:
        raise ValueError(f"{name} labels must lie in [0, {n_out}) for a {n_out}-way output, got labels in [{lo}, {hi}]; "
                         "remap labels to 0..n_way-1 per episode")


def lr_table(lrs, steps: int, names: list[str], device, dtype=torch.float32) -> Tensor:
    """[steps, n_params] learning rates from a float, a per-parameter vector, or a full table
    (a float becomes a tensor of the params' precision, so float64 runs keep exact rates)."""
    if isinstance(lrs, (int, float)):
        if not lrs > 0:
            raise ValueError(f"inner lr must be > 0, got {lrs}")
        return torch.full((steps, len(names)), float(lrs), device=device, dtype=dtype)
    lrs = torch.as_tensor(lrs, device=device)
    if lrs.dim() == 1 and lrs.numel() == len(names):
        return lrs.unsqueeze(0).expand(steps, -1)
    if lrs.dim() == 2 and tuple(lrs.shape) == (steps, len(names)):
        return lrs
    raise ValueError(f"lrs must be a float, [{len(names)}] (one per parameter) or [{steps}, {len(names)}] "
                     f"(per step and parameter), got shape {list(lrs.shape)}")


def per_task_loss(outputs: Tensor, y: Tensor, loss: str = "cross_entropy", name: str = "support"):
    """(loss [T], accuracy [T]) of each task; accuracy is NaN for regression."""
    T, N = y.shape[:2]
    if loss == "mse":
        if outputs.shape != y.shape:
            raise ValueError(f"{name}: model outputs {list(outputs.shape)} do not match targets {list(y.shape)}")
        per = (outputs - y.to(outputs.dtype)).pow(2).reshape(T, -1).mean(1)
        return per, torch.full((T,), math.nan, device=y.device)
    _check_labels(y, outputs.shape[-1], name)
    per = F.cross_entropy(outputs.reshape(T * N, -1), y.reshape(-1), reduction="none").view(T, N).mean(1)
    return per, (outputs.detach().argmax(-1) == y).float().mean(1)


def query_pass(task_model, weights: dict[str, Tensor], xq: Tensor, yq: Tensor, *, step: int,
               settings: InnerLoopSettings, update_stats: bool = False) -> tuple[Tensor, Tensor]:
    """Per-task query loss and accuracy ([T] each) under `weights`, the weights after `step` inner
    updates: the points of the adaptation curve, the multi-step loss terms and the meta-objective
    all come from here. update_stats folds the pass's BN statistics into the running ones."""
    out = task_model(weights, to_compute(xq), step=step, bn_mode=settings.bn_mode, update_stats=update_stats)
    return per_task_loss(out, yq, settings.loss, "query")


def masked_mean(v: Tensor, ok: Tensor) -> float:
    """Mean of v over the tasks that are ok (NaN when none is)."""
    return float(v[ok].mean()) if bool(ok.any()) else math.nan
