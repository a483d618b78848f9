"""EpisodeSampler, task batches, sharding, prefetch and augmentation on a synthetic dataset whose
pixels name their class and drawing, so every sampled image can be traced back."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from meta_kernels.config import EpisodeConfig
from meta_kernels.data import (ClassImages, DataError, EpisodeDataset, EpisodeSampler, Prefetcher, RandomCropFlip,
                               TaskBatch, assign_splits, collate_tasks, episode_rng, shard_bounds)
from meta_kernels.data.episodes import choose_without_replacement

REPO = Path(__file__).resolve().parents[1]


def synthetic(counts) -> ClassImages:
    """Class c has counts[c] images; pixel (0, 0) = class, (0, 1) = drawing index."""
    labels = np.repeat(np.arange(len(counts)), counts)
    drawing = np.concatenate([np.arange(n) for n in counts])
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.from_numpy(labels)
    images[:, 0, 0, 1] = torch.from_numpy(drawing)
    images[:, 0, 1:, :] = torch.from_numpy((labels * 7 + drawing) % 251)[:, None, None]
    # Shuffled input order: from_labels must group by class itself.
    perm = np.random.default_rng(1).permutation(len(labels))
    return ClassImages.from_labels(images[perm], labels[perm], [f"c{i}" for i in range(len(counts))],
                                   {"dataset": "synthetic", "split": "train"})


def digest(b: TaskBatch) -> str:
    h = hashlib.sha256()
    for t in (b.x_support, b.y_support, b.x_query, b.y_query, b.classes):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


CFG = EpisodeConfig(n_way=5, k_shot=2, q_query=3, episodes_per_epoch=64)


@pytest.fixture(scope="module")
def sampler() -> EpisodeSampler:
    return EpisodeSampler(synthetic([20] * 30), CFG, seed=7)


def pixel_ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    px = (x * 255).round().long()
    return px[..., 0, 0, 0], px[..., 0, 0, 1]  # class, drawing


def test_episode_shapes_labels_and_balance(sampler):
    b = sampler.meta_batch(0, 0, 8)
    assert b.x_support.shape == (8, 10, 1, 4, 4) and b.x_query.shape == (8, 15, 1, 4, 4)
    assert b.x_support.dtype == torch.float32 and b.y_support.dtype == torch.int64
    assert b.y_support.shape == (8, 10) and b.y_query.shape == (8, 15) and b.classes.shape == (8, 5)
    for t in range(8):
        assert Counter(b.y_support[t].tolist()) == {j: 2 for j in range(5)}
        assert Counter(b.y_query[t].tolist()) == {j: 3 for j in range(5)}
        assert len(set(b.classes[t].tolist())) == 5
        cs, ds = pixel_ids(b.x_support[t])
        cq, dq = pixel_ids(b.x_query[t])
        # Label j is the same dataset class in support and query, the one classes[t, j] names.
        assert torch.equal(cs, b.classes[t][b.y_support[t]]) and torch.equal(cq, b.classes[t][b.y_query[t]])
        # No image twice in an episode (support and query disjoint).
        pairs = list(zip(cs.tolist() + cq.tolist(), ds.tolist() + dq.tolist()))
        assert len(set(pairs)) == len(pairs)


def test_same_key_same_episode_and_batch_independent(sampler):
    a = sampler.episodes(3, [5, 9, 11])
    assert digest(a) == digest(sampler.episodes(3, [5, 9, 11]))
    # Episode 9 alone equals episode 9 inside a batch: episodes do not depend on their neighbours.
    alone = sampler.episode(3, 9)
    assert torch.equal(alone.x_query[0], a.x_query[1]) and torch.equal(alone.classes[0], a.classes[1])
    # A fresh sampler on the same data, seed and config gives the same episodes; epoch, index and
    # seed each change them.
    assert digest(EpisodeSampler(sampler.dataset, CFG, seed=7).episodes(3, [5, 9, 11])) == digest(a)
    assert digest(sampler.episodes(4, [5, 9, 11])) != digest(a)
    assert digest(sampler.episodes(3, [6, 9, 11])) != digest(a)
    assert digest(EpisodeSampler(sampler.dataset, CFG, seed=8).episodes(3, [5, 9, 11])) != digest(a)


def test_global_rng_state_does_not_matter(sampler):
    torch.manual_seed(0), np.random.seed(0)
    a = digest(sampler.episodes(1, range(4)))
    torch.manual_seed(123), np.random.seed(123), torch.rand(10), np.random.rand(10)
    assert digest(sampler.episodes(1, range(4))) == a


SUBPROCESS_CODE = """
import hashlib, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
np.random.seed(99); torch.manual_seed(99)
from test_data_episodes import CFG, digest, synthetic
from meta_kernels.data import EpisodeSampler
print(digest(EpisodeSampler(synthetic([20] * 30), CFG, seed=7).episodes(2, [0, 17, 63])))
"""


def test_same_episode_in_another_process(sampler):
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", SUBPROCESS_CODE.format(tests=str(REPO / "tests"))],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == digest(sampler.episodes(2, [0, 17, 63]))


def test_same_episodes_in_dataloader_workers(sampler):
    ds = EpisodeDataset(sampler, epoch=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_tasks)
    batches = list(loader)
    assert len(batches) == 16 and all(isinstance(b, TaskBatch) and b.n_tasks == 4 for b in batches)
    for i in (0, 7, 15):
        assert digest(batches[i]) == digest(sampler.episodes(2, range(4 * i, 4 * i + 4)))


def test_classes_drawn_uniformly():
    s = EpisodeSampler(synthetic([6] * 10), EpisodeConfig(n_way=5, k_shot=1, q_query=1, episodes_per_epoch=800))
    b = s.episodes(0, range(800))
    counts = np.bincount(b.classes.flatten().numpy(), minlength=10)  # expected 400 each
    assert counts.min() > 330 and counts.max() < 470, counts
    first = np.bincount(b.classes[:, 0].numpy(), minlength=10)  # label 0 is any class: expected 80
    assert first.min() > 45 and first.max() < 120, first
    # Every drawing of a class is used, about equally (2 of 6 per visit).
    _, d = pixel_ids(b.x_support)
    dq = pixel_ids(b.x_query)[1]
    used = np.bincount(torch.cat([d.flatten(), dq.flatten()]).numpy(), minlength=6)
    assert used.min() > 0.8 * used.mean() and used.max() < 1.2 * used.mean(), used


def test_choose_without_replacement_is_uniform_and_distinct():
    u = np.random.default_rng(0).random((20000, 3))
    out = choose_without_replacement(u, 4)
    assert all(len(set(r)) == 3 for r in out.tolist()) and out.min() == 0 and out.max() == 3
    # 24 ordered triples of 4 values, ~833 each.
    triples = Counter(map(tuple, out.tolist()))
    assert len(triples) == 24 and min(triples.values()) > 700 and max(triples.values()) < 970


def test_unequal_class_sizes_never_pick_past_a_class():
    s = EpisodeSampler(synthetic([3, 4, 9, 30, 5, 3]), EpisodeConfig(n_way=6, k_shot=1, q_query=2, episodes_per_epoch=50))
    b = s.episodes(0, range(50))
    counts = np.array([3, 4, 9, 30, 5, 3])
    for x in (b.x_support, b.x_query):
        c, d = pixel_ids(x)
        assert (d < torch.from_numpy(counts)[c]).all()
    c, d = pixel_ids(torch.cat([b.x_support, b.x_query], 1))
    for t in range(50):  # classes with exactly K + Q images use all of them
        pairs = set(zip(c[t].tolist(), d[t].tolist()))
        assert {(0, i) for i in range(3)} <= pairs and {(5, i) for i in range(3)} <= pairs


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_sharding_covers_the_meta_batch_exactly(sampler, world_size):
    full = sampler.meta_batch(1, 3, 8)
    shards = [sampler.meta_batch(1, 3, 8, rank=r, world_size=world_size) for r in range(world_size)]
    sizes = [s.n_tasks for s in shards]
    assert sum(sizes) == 8 and max(sizes) - min(sizes) <= 1
    assert digest(collate_tasks(shards)) == digest(full)
    bounds = [shard_bounds(8, r, world_size) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_epoch_iteration_resume_and_prefetch(sampler):
    plain = [digest(b) for b in sampler.epoch(0, 16)]
    assert len(plain) == 4 == sampler.steps_per_epoch(16)
    assert [digest(b) for b in sampler.epoch(0, 16, start_step=2)] == plain[2:]
    with sampler.epoch(0, 16, prefetch=2) as it:
        assert [digest(b) for b in it] == plain
    # Each epoch is a fresh draw.
    assert [digest(b) for b in sampler.epoch(1, 16)] != plain


def test_prefetcher_reraises_and_stops():
    def broken():
        yield 1
        raise KeyError("boom")
    it = Prefetcher(broken(), depth=1)
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)
    endless = Prefetcher(iter(int, 1), depth=2)  # never ends; close() must still stop the thread
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()


def test_augmentation_is_seeded_by_the_episode_key():
    data = synthetic([20] * 30)
    aug = EpisodeSampler(data, CFG, seed=7, augment=RandomCropFlip(padding=1, flip=True))
    plain = EpisodeSampler(data, CFG, seed=7)
    a = aug.episodes(0, range(6))
    assert digest(a) == digest(aug.episodes(0, range(6)))
    assert torch.equal(aug.episode(0, 4).x_query[0], a.x_query[4])
    p = plain.episodes(0, range(6))
    # Same classes and labels as without augmentation (separate random stream), different pixels.
    assert torch.equal(a.classes, p.classes) and torch.equal(a.y_query, p.y_query)
    assert not torch.equal(a.x_query, p.x_query)
    assert digest(aug.episodes(1, range(6))) != digest(aug.episodes(0, range(6)))


def test_flip_only_augmentation_mirrors_or_keeps_each_image():
    x = torch.randint(0, 256, (3, 40, 2, 5, 6), dtype=torch.uint8)
    rngs = [episode_rng(0, 0, i, 1) for i in range(3)]
    out = RandomCropFlip(padding=0, flip=True)(x, rngs)
    same = (out == x).flatten(2).all(2)
    mirrored = (out == x.flip(-1)).flatten(2).all(2)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    shifted = RandomCropFlip(padding=2, flip=False)(x, [episode_rng(0, 0, i, 1) for i in range(3)])
    assert shifted.shape == x.shape and not torch.equal(shifted, x)


def test_task_batch_to(sampler):
    b = sampler.meta_batch(0, 0, 4)
    moved = b.to("cpu", non_blocking=True)
    assert digest(moved) == digest(b)
    assert moved.support[0] is moved.x_support and moved.query[1] is moved.y_query


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_batches_to_cuda(sampler):
    b = sampler.meta_batch(0, 0, 4)
    pinned = b.pin_memory()
    assert pinned.x_query.is_pinned() and digest(pinned) == digest(b)
    cuda = pinned.to("cuda", non_blocking=True)
    assert cuda.x_support.is_cuda and torch.equal(cuda.y_query.cpu(), b.y_query)
    with sampler.epoch(0, 16, prefetch=2, pin_memory=True) as it:
        assert all(batch.x_support.is_pinned() for batch in it)


def test_state_dict_names_what_fixes_the_episodes(sampler):
    sd = sampler.state_dict()
    assert sd["seed"] == 7 and (sd["n_way"], sd["k_shot"], sd["q_query"]) == (5, 2, 3)
    assert sd["data"]["dataset"] == "synthetic" and sd["n_classes"] == 30


def test_assign_splits_is_disjoint_complete_and_seeded():
    units = [f"u{i}" for i in range(23)]
    a = assign_splits(units, 0.2, 0.3, seed=0)
    assert set(a) == set(units) and Counter(a.values()) == {"test": 7, "val": 5, "train": 11}
    assert a == assign_splits(list(reversed(units)), 0.2, 0.3, seed=0)  # input order does not matter
    assert a != assign_splits(units, 0.2, 0.3, seed=1)
    with pytest.raises(DataError, match="train split would be empty"):
        assign_splits(["a", "b"], 0.5, 0.5, seed=0)


def test_rotations_and_select():
    data = synthetic([2, 3])
    rot = data.with_rotations()
    assert rot.n_classes == 8 and rot.class_names[:4] == ("c0/rot0", "c0/rot90", "c0/rot180", "c0/rot270")
    assert torch.equal(rot.counts, torch.tensor([2] * 4 + [3] * 4))
    first = data.images[0]
    assert torch.equal(rot.images[rot.offsets[1]], torch.rot90(first, 1, (1, 2)))
    sub = data.select([1])
    assert sub.class_names == ("c1",) and torch.equal(sub.images, data.images[2:])


def test_bad_requests_fail_clearly():
    data = synthetic([20] * 4)
    with pytest.raises(DataError, match=r"n_way=5 is larger than the 4 classes of the synthetic train split"):
        EpisodeSampler(data, EpisodeConfig(n_way=5))
    with pytest.raises(DataError, match=r"fewer than k_shot \+ q_query = 16 images: 'c1' \(15\)"):
        EpisodeSampler(synthetic([20, 15, 20]), EpisodeConfig(n_way=2, k_shot=1, q_query=15))
    s = EpisodeSampler(data, EpisodeConfig(n_way=3, episodes_per_epoch=10))
    with pytest.raises(DataError, match="every rank needs >= 1 task"):
        s.meta_batch(0, 0, 2, rank=0, world_size=3)
    with pytest.raises(DataError, match="rank must be in"):
        s.meta_batch(0, 0, 4, rank=4, world_size=4)
    with pytest.raises(DataError, match=r"step must be in \[0, 2\)"):
        s.meta_batch(0, 2, 5)
    with pytest.raises(DataError, match="meta_batch_size must be in"):
        s.steps_per_epoch(11)
    with pytest.raises(DataError, match=r"must be in \[0, 2\*\*32\)"):
        s.episode(-1, 0)
