"""The original learn2learn 0.2 MAML / MetaSGD, for side-by-side checks and benchmarks.

learn2learn 0.2.0 no longer builds on Python 3.11 (its Cython data extensions), but its
algorithms are pure Python. `load()` fetches the sdist from PyPI once (pip download, into the
cache folder), checks its SHA-256, and imports only `learn2learn.utils` and
`learn2learn.algorithms.{maml,meta_sgd,base_learner}` from it, as a package named `learn2learn`.
None of its code is part of meta_kernels.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import tarfile
from pathlib import Path

from meta_kernels.data.cache import default_cache_dir, file_sha256

SDIST = "learn2learn-0.2.0.tar.gz"
SHA256 = "69f1d7cb0d0a6be7a2c6ad8e83e2ebbe70fb05e51d61e45e63078b40c75ea419"
_FILES = ("utils/__init__.py", "algorithms/base_learner.py", "algorithms/maml.py", "algorithms/meta_sgd.py")


class Unavailable(RuntimeError):
    """The sdist could not be fetched or did not match its checksum."""


def load(cache_dir: Path | None = None, timeout: float = 120):
    """The `learn2learn` module with `algorithms.MAML`, `algorithms.MetaSGD` and `utils`."""
    if "learn2learn" in sys.modules:
        return sys.modules["learn2learn"]
    root = (cache_dir or default_cache_dir()) / "learn2learn-0.2.0"
    sdist = root / SDIST
    if not sdist.exists():
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--retries", "0", "--timeout", "15", "--no-deps",
               "--no-binary", ":all:", "learn2learn==0.2.0", "-d", str(root)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            raise Unavailable(f"could not download {SDIST} from PyPI ({e}); offline? place the file in {root}") from e
    if file_sha256(sdist) != SHA256:
        raise Unavailable(f"{sdist} does not match the SHA-256 of learn2learn 0.2.0's sdist; delete it and retry")
    package = root / "src" / "learn2learn"
    if not (package / "algorithms" / "__init__.py").exists():
        with tarfile.open(sdist) as tar:
            for name in _FILES:
                member = tar.getmember(f"learn2learn-0.2.0/learn2learn/{name}")
                (package / name).parent.mkdir(parents=True, exist_ok=True)
                (package / name).write_bytes(tar.extractfile(member).read())
        (package / "__init__.py").write_text("from . import algorithms, utils\n")
        (package / "algorithms" / "__init__.py").write_text(
            "from .maml import MAML, maml_update\nfrom .meta_sgd import MetaSGD, meta_sgd_update\n")
    sys.path.insert(0, str(package.parent))
    try:
        return importlib.import_module("learn2learn")
    finally:
        sys.path.remove(str(package.parent))
