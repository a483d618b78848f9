"""The decoded-image cache: one torch file per (source, transform), written atomically.

Decoding thousands of PNGs/JPEGs costs seconds; loading one uint8 tensor file costs
milliseconds. A cache file's name carries a hash of everything that shaped its content (the
source's checksum or listing and the transform), so a changed source or transform can never be
served a stale entry, and a file is either complete or absent (temp file + rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

CACHE_VERSION = 1  # bump when the layout of cached dicts changes


def default_cache_dir() -> Path:
    """$META_KERNELS_CACHE, else ~/.cache/meta_kernels."""
    return Path(os.environ.get("META_KERNELS_CACHE", Path.home() / ".cache" / "meta_kernels")).expanduser()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def listing_fingerprint(root: Path, files: Iterable[Path]) -> str:
    """Hash of (relative path, size, mtime) of unpacked files. Hashing their contents would cost
    as much as decoding them, which is what the cache saves; a copy that changes mtimes only
    costs one re-decode."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over `path`: readers see the old
    file or the complete new one, and an error leaves no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cached(cache_dir: Path | None, stem: str, key: str, build: Callable[[], dict]) -> dict:
    """The dict cached under (stem, key), built and saved on a miss. cache_dir=None: the default
    folder; a corrupt cache file (e.g. a disk filled up by hand-copying) is rebuilt, not trusted."""
    path = Path(cache_dir or default_cache_dir()).expanduser() / f"{stem}-{key[:20]}.pt"
    if path.exists():
        try:
            obj = torch.load(path, weights_only=True)
            if obj.get("key") == key:
                return obj
            reason = "key mismatch"
        except Exception as e:  # any unreadable file is treated as absent
            reason = f"{type(e).__name__}: {e}"
        warnings.warn(f"rebuilding unreadable cache file {path} ({reason})", RuntimeWarning, stacklevel=3)
    obj = {**build(), "key": key}
    atomic_save(obj, path)
    return obj
