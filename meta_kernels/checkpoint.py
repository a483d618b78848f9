"""Checkpoints that hold everything shaping the learned initialisation: weights, optimiser state,
the full config (inner steps and lrs, algorithm, sampler), RNG states and counters, with a format
version. Written atomically (temp file + rename), so a crash mid-write keeps the previous one.

Safety: a file is `MAGIC`, the SHA-256 of the rest, a newline, then torch.save's bytes. Loading
checks the checksum (a flipped byte is reported, never trained on) and unpickles with
`weights_only=True`, so a file holding anything but tensors and plain Python values is refused
and never executed. RNG states are stored as tensors and plain values for that reason.

Sharded (FSDP) runs write each checkpoint as a folder `step-N.dcp/` (and `best.dcp/`) through
torch.distributed.checkpoint: every rank writes its own shard of the weights and optimiser state,
nothing is gathered to one rank, and loading reshards to any number of ranks. Beside the shards
rank 0 writes `meta.pt` in the safe single-file format above: step, RNG, sampler, config,
counters, history, data fingerprint, and a manifest with the SHA-256 of every other file of the
folder. DCP's `.metadata` is a pickle, so loading checks the manifest before DCP reads anything.
The folder is written under a temp name and renamed by rank 0 once every rank has written."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from meta_kernels.config import SECTIONS
from meta_kernels.data.cache import file_sha256

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
    """The step checkpoints of a checkpoint folder (step-*.pt files and step-*.dcp folders), newest first."""
    found = [p for p in Path(folder).glob("step-*") if p.suffix in (".pt", SHARDED_SUFFIX)
             and p.stem.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def load_any_checkpoint(path: str | os.PathLike) -> dict:
    """A single-file checkpoint, or a sharded folder's meta.pt after checking every file of the
    folder against its manifest (the shards themselves are then read with load_sharded)."""
    return verify_sharded(path) if is_sharded_checkpoint(path) else load_checkpoint(path)


def load_latest_intact(folder: Path) -> tuple[dict, Path]:
    """The newest checkpoint of `folder` that loads: last.pt, else the newest intact step-*.pt
    file or step-*.dcp folder, with a warning naming the checkpoints passed over."""
    candidates = [p for p in [Path(folder) / "last.pt"] + step_checkpoints(folder) if p.exists()]
    if not candidates:
        raise CheckpointError(f"--resume: no checkpoint in {folder}, so nothing to continue (a run stopped before its "
                              "first save leaves none); start afresh without --resume: a folder without a checkpoint "
                              "is reused, its old files replaced")
    failures = []
    for path in candidates:
        try:
            data = load_any_checkpoint(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            warnings.warn("resuming from " + str(path) + " because " + "; ".join(failures), stacklevel=2)
        elif path.name != "last.pt" and path.suffix != SHARDED_SUFFIX:
            warnings.warn(f"no last.pt in {folder}; resuming from {path}, the newest step checkpoint", stacklevel=2)
        return data, path
    raise CheckpointError(f"no intact checkpoint in {folder}:\n  " + "\n  ".join(failures))


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_orphan_temp_files(folder: Path) -> None:
    """Temp files and folders of writes that a kill interrupted (what they were to replace is intact)."""
    for tmp in Path(folder).glob(".*.tmp"):
        remove_checkpoint(tmp)


# ---- sharded (DCP) checkpoints ------------------------------------------------------------------
SHARDED_SUFFIX = ".dcp"
SHARDED_META = "meta.pt"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_sharded(path: str | os.PathLike, state: dict, payload: dict) -> Path:
    """A collective: every rank writes its shards of `state` (DTensors, as get_state_dict gives
    them) into the folder `path` through torch.distributed.checkpoint; rank 0 writes `payload`
    and the manifest of checksums as meta.pt, then renames the finished folder into place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    rank = dist.get_rank()
    tmp = path.parent / f".{path.name}.tmp"
    if rank == 0:
        remove_checkpoint(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))  # returns once all ranks wrote
    if rank == 0:
        manifest = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        save_checkpoint(tmp / SHARDED_META, {**payload, "sharded": {"manifest": manifest,
                                                                      "world_size": dist.get_world_size()}})
        old = path.parent / f".{path.name}.old.tmp"
        if path.exists():
            remove_checkpoint(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        remove_checkpoint(old)
    dist.barrier()
    return path


def verify_sharded(path: str | os.PathLike) -> dict:
    """meta.pt of the sharded checkpoint folder `path`, after checking that the folder holds
    exactly the files of its manifest, each with its SHA-256. Raises CheckpointError naming the
    folder otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no sharded checkpoint folder at {path}")
    if not (path / SHARDED_META).is_file():
        raise CheckpointError(f"sharded checkpoint {path} is incomplete or not a meta_kernels checkpoint: it has no "
                              f"{SHARDED_META}")
    data = load_checkpoint(path / SHARDED_META)
    manifest = (data.get("sharded") or {}).get("manifest")
    if not isinstance(manifest, dict) or not manifest:
        raise CheckpointError(f"sharded checkpoint {path}: {SHARDED_META} has no manifest of its files")
    present = {p.name for p in path.iterdir()} - {SHARDED_META}
    if present != set(manifest):
        missing, extra = sorted(set(manifest) - present), sorted(present - set(manifest))
        raise CheckpointError(f"sharded checkpoint {path} is corrupt: files missing {missing}, unexpected {extra}")
    for name, digest in manifest.items():
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            raise CheckpointError(f"sharded checkpoint {path} is corrupt: {name} does not match its checksum "
                                  "(changed or truncated after it was written)")
    return data


def load_sharded(path: str | os.PathLike, state: dict, *, collective: bool = True) -> None:
    """Reads the shards of the folder `path` into `state` in place: with `collective`, a
    collective of the running process group (DTensors are resharded to its ranks); otherwise in
    this process alone, into plain tensors that receive the full values. The caller checked the
    folder with verify_sharded first: DCP's metadata file is a pickle."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    no_dist = not (collective and dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # "... assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=no_dist)


# Fields that shape training: resuming with any of them changed would not continue the same run.
TRAINING_FIELDS = {"maml": None, "mamlpp": None, "episodes": None, "data": None, "model": None,
                   "run": ("seed", "omniglot_variant", "data_root")}
# Fields of those sections that do not shape training: the inner-loop engines give the same
# meta-gradients (a run saved with engine torch_func resumes under auto).
NOT_TRAINING = {"maml": ("engine",)}


def config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section, fields in TRAINING_FIELDS.items():
        old, new = saved.get(section), current.get(section, {})
        if old is None:  # a checkpoint from before the section existed was trained with its defaults
            old = dataclasses.asdict(SECTIONS[section]())
        for key in sorted(set(old) | set(new)):
            if (fields is not None and key not in fields) or key in NOT_TRAINING.get(section, ()):
                continue
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r} != now {new.get(key)!r}")
    return diffs
