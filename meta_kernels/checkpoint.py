"""Checkpoints that hold everything shaping the learned initialisation: weights, optimiser state,
the full config (inner steps and lrs, algorithm, sampler), RNG states and counters, with a format
version. Written atomically (temp file + rename), so a crash mid-write keeps the previous one.

Safety: a file is `MAGIC`, the SHA-256 of the rest, a newline, then torch.save's bytes. Loading
checks the checksum (a flipped byte is reported, never trained on) and unpickles with
`weights_only=True`, so a file holding anything but tensors and plain Python values is refused
and never executed. RNG states are stored as tensors and plain values for that reason."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from meta_kernels.config import SECTIONS

FORMAT_VERSION = 2
MAGIC = b"meta_kernels checkpoint\n"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe, of an unknown format, or does not match the run."""


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Atomically writes {format_version, **payload} to path, with its checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, body)
    body = body.getbuffer()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n")
            f.write(body)
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
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is corrupt or not a meta_kernels checkpoint (format {FORMAT_VERSION}): "
                              "it does not start with the meta_kernels header")
    digest, _, body = raw[len(MAGIC):].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match its contents (changed or "
                              "truncated after it was written)")
    try:
        data = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an object the safe unpickler refuses, or a damaged archive
        raise CheckpointError(f"checkpoint {path} is refused: it holds something other than tensors and plain Python "
                              f"values, which could run code when loaded ({str(exc).splitlines()[0][:300]})") from exc
    if not isinstance(data, dict) or "format_version" not in data:
        raise CheckpointError(f"checkpoint {path} has no format version: not a meta_kernels checkpoint")
    if data["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {data['format_version']}; this meta_kernels "
                              f"reads version {FORMAT_VERSION}")
    return data


def step_checkpoints(folder: Path) -> list[Path]:
    """The step-*.pt files of a checkpoint folder, newest first."""
    return sorted(Path(folder).glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def load_latest_intact(folder: Path) -> tuple[dict, Path]:
    """The newest checkpoint of `folder` that loads: last.pt, else the newest intact step-*.pt,
    with a warning naming the files passed over."""
    candidates = [p for p in [Path(folder) / "last.pt"] + step_checkpoints(folder) if p.is_file()]
    if not candidates:
        raise CheckpointError(f"--resume: no checkpoint in {folder}; train without --resume first")
    failures = []
    for path in candidates:
        try:
            data = load_checkpoint(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            warnings.warn("resuming from " + str(path) + " because " + "; ".join(failures), stacklevel=2)
        elif path.name != "last.pt":
            warnings.warn(f"no last.pt in {folder}; resuming from {path}, the newest step checkpoint", stacklevel=2)
        return data, path
    raise CheckpointError(f"no intact checkpoint in {folder}:\n  " + "\n  ".join(failures))


def remove_orphan_temp_files(folder: Path) -> None:
    """Temp files of writes that a kill interrupted (the file they were to replace is intact)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# Fields that shape training: resuming with any of them changed would not continue the same run.
TRAINING_FIELDS = {"maml": None, "mamlpp": None, "episodes": None, "data": None, "model": None,
                   "run": ("seed", "omniglot_variant", "data_root")}


def config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section, fields in TRAINING_FIELDS.items():
        old, new = saved.get(section), current.get(section, {})
        if old is None:  # a checkpoint from before the section existed was trained with its defaults
            old = dataclasses.asdict(SECTIONS[section]())
        for key in sorted(set(old) | set(new)):
            if fields is not None and key not in fields:
                continue
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r} != now {new.get(key)!r}")
    return diffs
