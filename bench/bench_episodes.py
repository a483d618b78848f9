"""Episode throughput and Omniglot load times (pytest-benchmark).

    pytest bench/bench_episodes.py --benchmark-columns=mean,stddev,rounds

Bars (2-core CPU): >= 5,000 tasks/s for Omniglot 5-way 1-shot 15-query at meta-batch 32 on one
core, so data is never the bottleneck of training; cold load of the two background-small zips
<= 10 s; warm load from the cache <= 1 s. Real data: $META_KERNELS_DATA/omniglot, else
../shared/data/omniglot next to the repository.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from meta_kernels.config import EpisodeConfig
from meta_kernels.data import EpisodeSampler, load_omniglot

META_BATCH = 32


@pytest.fixture(scope="module")
def root() -> Path:
    base = os.environ.get("META_KERNELS_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(base) / "omniglot"
    if not path.is_dir():
        pytest.skip(f"Omniglot data not found at {path}: set META_KERNELS_DATA")
    return path


def load(root: Path, cache_dir: Path):
    return load_omniglot(root, "train", variant="small", cache_dir=cache_dir)


def mean_seconds(benchmark) -> float | None:
    return None if benchmark.disabled else benchmark.stats.stats.mean


def test_cold_load(benchmark, root, tmp_path):
    fresh = (tmp_path / f"cold{i}" for i in itertools.count())  # an empty cache every round
    benchmark.pedantic(lambda d: load(root, d), setup=lambda: ((next(fresh),), {}), rounds=3)
    if (t := mean_seconds(benchmark)) is not None:
        assert t <= 10.0, f"cold load took {t:.2f} s, bar 10 s"


def test_warm_load(benchmark, root, tmp_path):
    load(root, tmp_path)
    benchmark.pedantic(load, args=(root, tmp_path), rounds=10, warmup_rounds=1)
    if (t := mean_seconds(benchmark)) is not None:
        assert t <= 1.0, f"warm load took {t:.3f} s, bar 1 s"


def test_tasks_per_second(benchmark, root, tmp_path):
    cfg = EpisodeConfig(n_way=5, k_shot=1, q_query=15, episodes_per_epoch=META_BATCH * 1000)
    sampler = EpisodeSampler(load(root, tmp_path), cfg, seed=0)
    steps = itertools.cycle(range(sampler.steps_per_epoch(META_BATCH)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the bar is per core
    try:
        batch = benchmark(lambda: sampler.meta_batch(0, next(steps), META_BATCH))
    finally:
        torch.set_num_threads(threads)
    assert batch.x_query.shape == (META_BATCH, 75, 1, 28, 28)
    if (t := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["tasks_per_s"] = META_BATCH / t
        assert META_BATCH / t >= 5000, f"{META_BATCH / t:.0f} tasks/s, bar 5,000"
