"""Configuration dataclasses. Every config validates itself when built, so a bad value
fails at construction with the field named, not deep inside training."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KNOWN_DATASETS = ("omniglot", "mini_imagenet", "custom", "sinusoid")
ALGORITHMS = ("maml", "fomaml", "reptile")
ENGINES = ("torch_func", "custom", "higher")
OP_BACKENDS = ("auto", "cuda", "triton", "cpp", "reference")
BN_MODES = ("transductive", "per_step", "frozen")
MSL_WEIGHTS = ("uniform", "linear_increase", "learned")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(cond: bool, cls: str, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{field}: {msg}")


@dataclass
class EpisodeConfig:
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    episodes_per_epoch: int = 600
    dataset: str = "omniglot"

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("n_way", "k_shot", "q_query", "episodes_per_epoch"):
            value = getattr(self, field)
            _require(isinstance(value, int) and not isinstance(value, bool), name, field,
                     f"must be an integer, got {value!r}")
            _require(value >= 1, name, field, f"must be >= 1, got {value}")
        _require(self.n_way >= 2, name, "n_way", f"must be >= 2 for a classification episode, got {self.n_way}")
        _require(self.dataset in KNOWN_DATASETS, name, "dataset",
                 f"unknown dataset {self.dataset!r}; choose one of {', '.join(KNOWN_DATASETS)}")

    def replace(self, **changes) -> "EpisodeConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class MAMLConfig:
    """The inner loop and the outer update. `second_order` follows `algo` (MAML: True; FOMAML and
    Reptile: False); setting it against the algorithm is an error, never silently overridden."""
    algo: str = "maml"
    inner_steps: int = 5
    inner_lr: float = 0.01
    inner_clip: float | None = 10.0
    second_order: bool | None = None
    backend: str = "auto"
    engine: str = "torch_func"
    meta_lr: float = 1e-3
    meta_batch_size: int = 4
    reptile_epsilon: float = 1.0
    reptile_decay_steps: int = 0  # linear decay of epsilon to 0 over this many outer steps (0: none)
    task_chunk: int = 0  # tasks adapted together per chunk in a training step (0: the whole meta-batch)
    skip_nonfinite_tasks: bool = False  # skip (and count) a task whose inner loss is NaN/inf instead of raising
    loss: str = "cross_entropy"  # or "mse" (regression, e.g. the sinusoid demo)

    def __post_init__(self) -> None:
        name = type(self).__name__
        _require(self.algo in ALGORITHMS, name, "algo", f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        implied = self.algo == "maml"
        if self.second_order is None:
            self.second_order = implied
        _require(self.second_order == implied, name, "second_order",
                 f"{self.second_order} conflicts with algo={self.algo!r} (which is {'second' if implied else 'first'} order); "
                 "leave second_order unset or choose the matching algorithm")
        _require(isinstance(self.inner_steps, int) and self.inner_steps >= 1, name, "inner_steps",
                 f"must be an integer >= 1, got {self.inner_steps!r}")
        _require(self.inner_lr > 0, name, "inner_lr", f"must be > 0, got {self.inner_lr}")
        _require(self.inner_clip is None or self.inner_clip > 0, name, "inner_clip",
                 f"must be > 0 or None (no clipping), got {self.inner_clip}")
        _require(self.backend in OP_BACKENDS, name, "backend", f"unknown backend {self.backend!r}; choose one of {', '.join(OP_BACKENDS)}")
        _require(self.engine in ENGINES, name, "engine", f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        _require(self.meta_lr > 0, name, "meta_lr", f"must be > 0, got {self.meta_lr}")
        _require(self.meta_batch_size >= 1, name, "meta_batch_size", f"must be >= 1, got {self.meta_batch_size}")
        _require(0 < self.reptile_epsilon <= 1, name, "reptile_epsilon", f"must be in (0, 1], got {self.reptile_epsilon}")
        _require(self.reptile_decay_steps >= 0, name, "reptile_decay_steps", f"must be >= 0, got {self.reptile_decay_steps}")
        _require(self.task_chunk >= 0, name, "task_chunk", f"must be >= 0, got {self.task_chunk}")
        _require(self.loss in ("cross_entropy", "mse"), name, "loss", f"must be 'cross_entropy' or 'mse', got {self.loss!r}")

    @property
    def first_order(self) -> bool:
        return not self.second_order

    def replace(self, **changes) -> "MAMLConfig":
        if "algo" in changes and "second_order" not in changes:
            changes["second_order"] = None
        return dataclasses.replace(self, **changes)
