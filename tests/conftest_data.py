"""Shared fixtures of the data tests (imported by tests/test_data_*.py; pytest does not load this
file by itself). Real data is found through $META_KERNELS_DATA, else ../shared/data next to the
repository; it is only read, never copied into the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path | None:
    env = os.environ.get("META_KERNELS_DATA")
    if env:
        return Path(env)  # set by CI: a missing file there must fail the tests, not skip them
    fallback = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return fallback if fallback.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data not found: set META_KERNELS_DATA to the folder holding omniglot/ and "
                    "mini_imagenet/ (or place it at ../shared/data next to the repository)")
    return d
