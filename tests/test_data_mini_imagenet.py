"""mini-ImageNet: the real Ravi & Larochelle split files, and loading from a generated fixture
in exactly their layout (their class names and filenames, a few synthetic images per class)."""
from __future__ import annotations

import csv
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest_data import shared_data  # noqa: F401  (fixture)
from meta_kernels.config import EpisodeConfig
from meta_kernels.data import DataError, EpisodeSampler, load_dataset, load_mini_imagenet
from meta_kernels.data import base as base_module
from meta_kernels.data.mini_imagenet import read_split_csv

PER_CLASS = 4


def test_real_split_files_are_the_64_16_20_class_split(shared_data):
    rows = {s: read_split_csv(shared_data / "mini_imagenet" / f"{s}.csv") for s in ("train", "val", "test")}
    classes = {s: Counter(lab for _, lab in r) for s, r in rows.items()}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert all(set(c.values()) == {600} for c in classes.values())
    assert not set(classes["train"]) & set(classes["val"]) and not set(classes["train"]) & set(classes["test"])
    assert not set(classes["val"]) & set(classes["test"])


@pytest.fixture(scope="module")
def fixture_root(shared_data, tmp_path_factory) -> Path:
    """The real layout: train/val/test.csv with the real header, classes and filenames (the
    first PER_CLASS rows of each class) and images/ with synthetic JPEGs of varied sizes."""
    root = tmp_path_factory.mktemp("mini_imagenet")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        by_class = defaultdict(list)
        for name, label in read_split_csv(shared_data / "mini_imagenet" / f"{split}.csv"):
            if len(by_class[label]) < PER_CLASS:
                by_class[label].append(name)
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for label, names in by_class.items():
                for name in names:
                    w.writerow([name, label])
                    h, w_ = rng.integers(60, 120, size=2)
                    Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8)).save(root / "images" / name)
    return root


def test_fixture_loads_every_split(fixture_root, tmp_path):
    for split, n in (("train", 64), ("val", 16), ("test", 20)):
        d = load_mini_imagenet(fixture_root, split, cache_dir=tmp_path)
        assert d.n_classes == n and d.images.shape == (n * PER_CLASS, 3, 84, 84) and (d.counts == PER_CLASS).all()
        assert d.class_names[0].startswith("n0") and d.info["split"] == split
    s = EpisodeSampler(d, EpisodeConfig(n_way=5, k_shot=1, q_query=3, dataset="mini_imagenet"), seed=1)
    b = s.meta_batch(0, 0, 4)
    assert b.x_support.shape == (4, 5, 3, 84, 84) and b.x_query.shape == (4, 15, 3, 84, 84)


def test_images_keep_their_class_and_warm_load_decodes_nothing(fixture_root, tmp_path, monkeypatch):
    d = load_mini_imagenet(fixture_root, "val", cache_dir=tmp_path)
    first_row = read_split_csv(fixture_root / "val.csv")[0]
    with Image.open(fixture_root / "images" / first_row[0]) as im:
        expected = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    c = d.class_names.index(first_row[1])
    assert torch.equal(d.images[d.offsets[c]], torch.from_numpy(expected.copy()))

    monkeypatch.setattr(base_module, "decode_image", lambda *a: pytest.fail("decoded on a warm load"))
    warm = load_dataset("mini_imagenet", fixture_root, "val", cache_dir=tmp_path)
    assert torch.equal(warm.images, d.images) and warm.class_names == d.class_names


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_input_fails_clearly(fixture_root, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"split file .*missing.*test.csv not found: put the Ravi & Larochelle split files"):
        load_mini_imagenet(tmp_path / "missing", "test", cache_dir=cache)

    root = copy_layout(fixture_root, tmp_path / "no_images")
    shutil.rmtree(root / "images")
    with pytest.raises(DataError, match=rf"image folder {root / 'images'} not found: put the images named in "
                                        rf"{root / 'train.csv'} \(e.g. n\d+\.jpg\) there"):
        load_mini_imagenet(root, "train", cache_dir=cache)

    root = copy_layout(fixture_root, tmp_path / "one_missing")
    gone = read_split_csv(root / "val.csv")[5][0]
    (root / "images" / gone).unlink()
    with pytest.raises(DataError, match=rf"1 image\(s\) listed in {root / 'val.csv'} are missing .* e.g. {gone}"):
        load_mini_imagenet(root, "val", cache_dir=cache)

    root = copy_layout(fixture_root, tmp_path / "corrupt")
    bad = read_split_csv(root / "test.csv")[2][0]
    (root / "images" / bad).write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(DataError, match=rf"{root / 'images' / bad} is not a readable image"):
        load_mini_imagenet(root, "test", cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written

    root = copy_layout(fixture_root, tmp_path / "bad_header")
    (root / "val.csv").write_text("image,class\nx.jpg,n01\n")
    with pytest.raises(DataError, match="must start with the header 'filename,label'"):
        load_mini_imagenet(root, "val", cache_dir=cache)
    (root / "val.csv").write_text("filename,label\nx.jpg\n")
    with pytest.raises(DataError, match=r"val.csv line 2: expected 'filename,label', got 'x.jpg'"):
        load_mini_imagenet(root, "val", cache_dir=cache)

    root = copy_layout(fixture_root, tmp_path / "leaky")
    leaked = read_split_csv(root / "train.csv")[0]
    with open(root / "test.csv", "a") as f:
        f.write(f"{leaked[0]},{leaked[1]}\n")
    with pytest.raises(DataError, match="share classes .*splits must be class-disjoint"):
        load_mini_imagenet(root, "train", cache_dir=cache)

    with pytest.raises(DataError, match="unknown split 'training'; choose one of train, val, test"):
        load_mini_imagenet(fixture_root, "training", cache_dir=cache)
