"""The `custom` class-folder dataset, the load_dataset factory and their bad-input errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meta_kernels.config import EpisodeConfig
from meta_kernels.data import DataError, EpisodeSampler, load_dataset, load_folder


def make_tree(root: Path, classes: int, per_class: int, size=(8, 8), prefix="class") -> Path:
    """Class i's images are filled with value 10 * i (PNG, lossless)."""
    for c in range(classes):
        d = root / f"{prefix}_{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((*size, 3), 10 * c, dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_flat_layout_is_split_on_classes(tmp_path):
    root = make_tree(tmp_path / "data", 10, 5)
    (root / "README.txt").write_text("root-level files are not data")
    (root / "class_03" / ".DS_Store").write_bytes(b"\0junk")  # hidden files are skipped
    parts = {s: load_folder(root, s, cache_dir=tmp_path / "c") for s in ("train", "val", "test")}
    names = {s: set(d.class_names) for s, d in parts.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert set().union(*names.values()) == {f"class_{c:02d}" for c in range(10)}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    d = parts["train"]
    assert d.images.shape == (30, 3, 8, 8) and (d.counts == 5).all()
    for c, name in enumerate(d.class_names):  # every image sits under its own class
        assert (d.images[d.offsets[c]:d.offsets[c + 1]] == 10 * int(name[-2:])).all()
    other_seed = load_folder(root, "val", split_seed=1, cache_dir=tmp_path / "c")
    assert set(other_seed.class_names) != names["val"]
    b = EpisodeSampler(d, EpisodeConfig(n_way=3, k_shot=2, q_query=3, dataset="custom")).episode(0, 0)
    assert b.x_support.shape == (1, 6, 3, 8, 8)


def test_pre_split_layout_and_load_dataset(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        make_tree(tmp_path / "data" / split, n, 3, prefix=split)
    d = load_dataset("custom", tmp_path / "data", "test", cache_dir=tmp_path / "c", mode="L", image_size=4)
    assert d.class_names == ("test_00", "test_01", "test_02") and d.images.shape == (9, 1, 4, 4)
    assert load_dataset("custom", tmp_path / "data", "train", cache_dir=tmp_path / "c").n_classes == 4


def test_bad_folders_fail_clearly(tmp_path):
    c = tmp_path / "cache"
    with pytest.raises(DataError, match="not found or not a folder"):
        load_folder(tmp_path / "nothing", cache_dir=c)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_folder(tmp_path / "flat", cache_dir=c)

    root = make_tree(tmp_path / "empty", 6, 2)
    for p in (root / "class_04").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=rf"class folder {root / 'class_04'} holds no images"):
        for s in ("train", "val", "test"):
            load_folder(root, s, cache_dir=c)

    root = make_tree(tmp_path / "text", 3, 2)
    (root / "class_01" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"{root / 'class_01' / 'notes.txt'} is not a readable image"):
        load_folder(root, "train", val_fraction=0, test_fraction=0, cache_dir=c)
    assert not c.exists() or not any(c.iterdir())  # nothing half-written

    root = make_tree(tmp_path / "nested", 3, 2)
    (root / "class_02" / "sub").mkdir()
    with pytest.raises(DataError, match="is not an image file: class folders hold images only"):
        load_folder(root, "train", val_fraction=0, test_fraction=0, cache_dir=c)

    root = make_tree(tmp_path / "sizes", 3, 2)
    Image.new("RGB", (9, 7)).save(root / "class_02" / "odd.png")
    with pytest.raises(DataError, match=r"odd.png has shape \(3, 7, 9\) .* pass image_size="):
        load_folder(root, "train", val_fraction=0, test_fraction=0, cache_dir=c)
    fixed = load_folder(root, "train", val_fraction=0, test_fraction=0, image_size=(6, 5), cache_dir=c)
    assert fixed.image_shape == (3, 6, 5)

    make_tree(tmp_path / "leak" / "train", 3, 2)
    make_tree(tmp_path / "leak" / "val", 1, 2)
    with pytest.raises(DataError, match="class 'class_00' is in both .*train and .*val: splits must be class-disjoint"):
        load_folder(tmp_path / "leak", "train", cache_dir=c)
    make_tree(tmp_path / "nosplit" / "train", 3, 2)
    with pytest.raises(DataError, match="is split into train folders but has no val/"):
        load_folder(tmp_path / "nosplit", "val", cache_dir=c)

    root = make_tree(tmp_path / "few", 4, 2)
    with pytest.raises(DataError, match=r"n_way=4 is larger than the 2 classes of the custom train split"):
        EpisodeSampler(load_folder(root, "train", cache_dir=c, val_fraction=0.25, test_fraction=0.25),
                       EpisodeConfig(n_way=4, k_shot=1, q_query=1, dataset="custom"))


def test_load_dataset_names_and_roots(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; choose one of omniglot, mini_imagenet, custom"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="sinusoid is a regression task"):
        load_dataset("sinusoid")
    with pytest.raises(DataError, match="the custom dataset needs root="):
        load_dataset("custom")
    monkeypatch.delenv("META_KERNELS_DATA", raising=False)
    with pytest.raises(DataError, match="pass root=... or set META_KERNELS_DATA"):
        load_dataset("omniglot")
    monkeypatch.setenv("META_KERNELS_DATA", str(tmp_path))
    with pytest.raises(DataError, match=rf"images_evaluation.zip in {tmp_path / 'omniglot'}:"):
        load_dataset("omniglot")
