"""Configuration dataclasses. Every config validates itself when built, so a bad value
fails at construction with the field named, not deep inside training."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KNOWN_DATASETS = ("omniglot", "mini_imagenet", "custom", "sinusoid")


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
