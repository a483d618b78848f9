"""Checkpoints that hold everything shaping the learned initialisation: weights, optimiser state,
the full config (inner steps and lrs, algorithm, sampler), RNG states and counters, with a format
version. Written atomically (temp file + rename), so a crash mid-write keeps the previous one."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, of an unknown format, or does not match the run."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Atomically writes {format_version, **payload} to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a meta_kernels checkpoint ({exc})") from exc
    if not isinstance(data, dict) or "format_version" not in data:
        raise CheckpointError(f"checkpoint {path} has no format version: not a meta_kernels checkpoint")
    if data["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {data['format_version']}; this meta_kernels "
                              f"reads version {FORMAT_VERSION}")
    return data


# Fields that shape training: resuming with any of them changed would not continue the same run.
TRAINING_FIELDS = {"maml": None, "mamlpp": None, "episodes": None, "model": None,
                   "run": ("seed", "omniglot_variant", "data_root")}


def config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section, fields in TRAINING_FIELDS.items():
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if fields is not None and key not in fields:
                continue
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r} != now {new.get(key)!r}")
    return diffs
