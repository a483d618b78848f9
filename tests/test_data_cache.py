"""The decoded-image cache: keyed, atomic, and robust to a damaged file."""
from __future__ import annotations

import pytest
import torch

from meta_kernels.data import cache as cache_module
from meta_kernels.data.cache import atomic_save, cache_key, cached, default_cache_dir


def test_hit_miss_and_keys(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"images": torch.arange(6, dtype=torch.uint8), "files": ["a", "b"]}
    k1, k2 = cache_key(source="x", size=28), cache_key(source="x", size=32)
    assert k1 != k2 and k1 == cache_key(size=28, source="x")
    first = cached(tmp_path, "set", k1, build)
    again = cached(tmp_path, "set", k1, build)
    assert len(calls) == 1 and torch.equal(again["images"], first["images"]) and again["files"] == ["a", "b"]
    cached(tmp_path, "set", k2, build)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real_save = torch.save

    def save_then_fail(obj, f):
        real_save(obj, f)  # bytes are on disk when the failure comes
        raise OSError("disk full")
    monkeypatch.setattr(cache_module.torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": torch.zeros(3)}, tmp_path / "sub" / "f.pt")
    assert list((tmp_path / "sub").iterdir()) == []
    with pytest.raises(OSError, match="disk full"):
        cached(tmp_path / "c", "set", cache_key(a=1), lambda: {"x": torch.zeros(2)})
    assert list((tmp_path / "c").iterdir()) == []


def test_failed_build_leaves_nothing(tmp_path):
    def build():
        raise ValueError("bad image")
    with pytest.raises(ValueError, match="bad image"):
        cached(tmp_path, "set", cache_key(a=1), build)
    assert list(tmp_path.iterdir()) == []


def test_damaged_cache_file_is_rebuilt(tmp_path):
    key = cache_key(a=1)
    cached(tmp_path, "set", key, lambda: {"x": torch.ones(4)})
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.warns(RuntimeWarning, match="rebuilding unreadable cache file"):
        obj = cached(tmp_path, "set", key, lambda: {"x": torch.full((4,), 2.0)})
    assert torch.equal(obj["x"], torch.full((4,), 2.0))
    assert torch.equal(cached(tmp_path, "set", key, lambda: pytest.fail("rebuilt twice"))["x"], obj["x"])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("META_KERNELS_CACHE", str(tmp_path / "mk"))
    assert default_cache_dir() == tmp_path / "mk"
    monkeypatch.delenv("META_KERNELS_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "meta_kernels")
