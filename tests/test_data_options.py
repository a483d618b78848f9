"""Data options (issue 18): the `data` config section (image_size, channels, class_depth), nested
class folders, one-image transforms, ClassImages.from_dataset, on real Omniglot drawings."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meta_kernels.checkpoint import CheckpointError, config_differences, load_checkpoint
from meta_kernels.config import ConfigError, EpisodeConfig, MetaLearningFullConfig
from meta_kernels.data import ClassImages, DataError, EpisodeSampler, RandomCropFlip, load_folder
from meta_kernels.data.base import decode_image
from meta_kernels.train import Trainer, load_split
from tests.conftest_data import shared_data  # noqa: F401 (fixture)

ZIP = "omniglot/images_background_small1.zip"


def drawings(shared: Path, alphabets: int, characters: int, per_character: int) -> dict[tuple[str, str], list[str]]:
    """Zip members of the first drawings of the first characters of the first alphabets."""
    with zipfile.ZipFile(shared / ZIP) as zf:
        members = sorted(m for m in zf.namelist() if m.endswith(".png"))
    out: dict[tuple[str, str], list[str]] = {}
    for m in members:
        _, alphabet, character, _ = m.split("/")
        out.setdefault((alphabet, character), []).append(m)
    names = sorted({a for a, _ in out})[:alphabets]
    return {(a, c): files[:per_character] for (a, c), files in sorted(out.items())
            if a in names and int(c[-2:]) <= characters}


def make_nested(shared: Path, root: Path, alphabets=3, characters=4, per_character=3, odd_size=None) -> dict:
    """root/<Alphabet>/<character>/<drawing>.png copied byte for byte from the official zip;
    odd_size: the first drawing of every character resized to it (mixed sizes)."""
    chosen = drawings(shared, alphabets, characters, per_character)
    with zipfile.ZipFile(shared / ZIP) as zf:
        for (a, c), members in chosen.items():
            (root / a / c).mkdir(parents=True)
            for i, m in enumerate(members):
                data = zf.read(m)
                if odd_size and i == 0:
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(data)).convert("L").resize((odd_size, odd_size)).save(buf, "PNG")
                    data = buf.getvalue()
                (root / a / c / m.rsplit("/", 1)[1]).write_bytes(data)
    return chosen


def test_nested_class_folders(shared_data, tmp_path):
    root = tmp_path / "tree"
    chosen = make_nested(shared_data, root)
    parts = {s: load_folder(root, s, mode="L", class_depth=2, val_fraction=0.25, test_fraction=0.25,
                            cache_dir=tmp_path / "c") for s in ("train", "val", "test")}
    names = [set(d.class_names) for d in parts.values()]
    assert set().union(*names) == {f"{a}/{c}" for a, c in chosen} and sum(map(len, names)) == len(chosen) == 12
    train = parts["train"]
    assert train.image_shape == (1, 105, 105) and (train.counts == 3).all() and train.info["class_depth"] == 2
    a, c = train.class_names[0].split("/")
    expect = np.stack([decode_image(p, None, "L", str(p)) for p in sorted((root / a / c).iterdir())])
    assert torch.equal(train.images[: 3], torch.from_numpy(expect))  # class 0 holds its own drawings
    batch = EpisodeSampler(train, EpisodeConfig(n_way=3, k_shot=1, q_query=2, dataset="custom")).episode(0, 0)
    assert batch.x_support.shape == (1, 3, 1, 105, 105)

    # The given-split layout nests the same way: root/<split>/<Alphabet>/<character>/.
    pre = tmp_path / "pre"
    make_nested(shared_data, pre / "train", alphabets=2, characters=2, per_character=2)
    make_nested(shared_data, pre / "val", alphabets=1, characters=2, per_character=2)
    (pre / "val" / next(iter(chosen))[0]).rename(pre / "val" / "Other")  # val's classes differ from train's
    d = load_folder(pre, "val", mode="L", class_depth=2, image_size=28, cache_dir=tmp_path / "c")
    assert d.class_names == ("Other/character01", "Other/character02") and d.images.shape == (4, 1, 28, 28)


def test_a_class_depth_that_finds_no_images_fails_clearly(shared_data, tmp_path):
    root = tmp_path / "tree"
    chosen = make_nested(shared_data, root, alphabets=2, characters=2, per_character=2)
    a, c = sorted(chosen)[0]
    with pytest.raises(DataError, match=rf"{root / a / c} has no sub-folders, but data.class_depth=3 puts the "
                                        rf"class folders 3 levels below {root}; set data.class_depth=2"):
        load_folder(root, "train", class_depth=3, val_fraction=0, test_fraction=0, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"is not an image file: class folders hold images only.*data.class_depth=1"):
        load_folder(root, "train", val_fraction=0, test_fraction=0, cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"data.class_depth: nested class folders are for folder datasets"):
        MetaLearningFullConfig.minimal().with_overrides(["data.class_depth=2"])  # Omniglot has no folder depth


def test_mixed_sizes_need_data_image_size(shared_data, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    make_nested(shared_data, root, alphabets=1, characters=3, per_character=2, odd_size=90)
    monkeypatch.setenv("META_KERNELS_CACHE", str(tmp_path / "c"))
    cfg = MetaLearningFullConfig.minimal().with_overrides(
        ["episodes.dataset=custom", f"run.data_root={root}", "data.class_depth=2"])
    with pytest.raises(DataError, match=r"has shape \(3, 105, 105\) .* has \(3, 90, 90\); set data.image_size "
                                        r"\(and data.channels: 1 or 3\) in the config, e.g. --set data.image_size=28"):
        load_split(cfg, "train")
    d = load_split(cfg.with_overrides(["data.image_size=28", "data.channels=1"]), "train")
    assert d.image_shape == (1, 28, 28) and d.info["image_size"] == (28, 28) and d.info["mode"] == "L"
    # Omniglot decodes to one channel: data.channels=3 repeats it, data.image_size sets its size.
    monkeypatch.setenv("META_KERNELS_DATA", str(shared_data))
    om = load_split(MetaLearningFullConfig.minimal().with_overrides(["data.image_size=20", "data.channels=3"]), "val")
    assert om.image_shape == (3, 20, 20) and torch.equal(om.images[:, 0], om.images[:, 2])
    assert om.info["channels"] == 3 and om.info["image_size"] == 20


def test_transform_may_be_any_one_image_callable(shared_data, tmp_path):
    root = tmp_path / "tree"
    (alphabet, _), *_ = make_nested(shared_data, root, alphabets=1, characters=4, per_character=4)
    data = load_folder(root / alphabet, "train", mode="L", image_size=28, val_fraction=0, test_fraction=0,
                       cache_dir=tmp_path / "c")
    cfg = EpisodeConfig(n_way=3, k_shot=1, q_query=2, dataset="custom")
    plain = EpisodeSampler(data, cfg, seed=3).episodes(0, [0, 1])

    flipped = EpisodeSampler(data, cfg, seed=3, augment=lambda img: torch.flip(img, dims=[2])).episodes(0, [0, 1])
    assert torch.equal(flipped.x_support, torch.flip(plain.x_support, dims=[4]))
    assert torch.equal(flipped.x_query, torch.flip(plain.x_query, dims=[4]))
    assert torch.equal(flipped.y_query, plain.y_query) and torch.equal(flipped.classes, plain.classes)

    class RandomInvert:  # shaped like a torchvision v2 transform: __call__(*inputs), torch's RNG
        def __call__(self, *inputs):
            return 255 - inputs[0] if torch.rand(()) < 0.5 else inputs[0]

    sampler = EpisodeSampler(data, cfg, seed=3, augment=RandomInvert())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = sampler.episodes(0, [0, 1]), sampler.episodes(0, [1])
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert torch.equal(a.x_support[1:], b.x_support) and torch.equal(a.x_query[1:], b.x_query)  # per episode
    inverted = (a.x_query != plain.x_query).flatten(2).any(2)
    assert inverted.any() and not inverted.all()  # some images inverted, not all

    scaled = EpisodeSampler(data, cfg, seed=3, augment=lambda img: img.float() / 255).episodes(0, [0, 1])
    torch.testing.assert_close(scaled.x_support, plain.x_support)  # a float result counts as already scaled
    with pytest.raises(DataError, match=r"a transform must return an image tensor \[C, H, W\], got ndarray"):
        EpisodeSampler(data, cfg, augment=lambda img: img.numpy()).episode(0, 0)
    # The batch form keeps working (RandomCropFlip and any f(x, rngs)).
    crop = EpisodeSampler(data, cfg, seed=3, augment=RandomCropFlip(padding=2)).episodes(0, [0, 1])
    same = EpisodeSampler(data, cfg, seed=3, augment=lambda x, rngs: RandomCropFlip(padding=2)(x, rngs)).episodes(0, [0, 1])
    assert torch.equal(crop.x_support, same.x_support) and not torch.equal(crop.x_support, plain.x_support)


class ZipOmniglot(torch.utils.data.Dataset):
    """Shaped like torchvision's Omniglot: item i is (PIL image, int character label). as_array /
    as_tensor: like a dataset with a numpy or ToTensor transform."""

    def __init__(self, path: Path, members: list[str], form: str = "pil"):
        self.path, self.members, self.form = path, members, form
        self.classes = sorted({m.rsplit("/", 1)[0].split("/", 1)[1] for m in members})

    def __len__(self):
        return len(self.members)

    def __getitem__(self, i):
        with zipfile.ZipFile(self.path) as zf:
            image = Image.open(io.BytesIO(zf.read(self.members[i]))).convert("L")
        label = self.classes.index(self.members[i].rsplit("/", 1)[0].split("/", 1)[1])
        if self.form == "array":
            return np.array(image), np.int64(label)
        if self.form == "tensor":
            return torch.from_numpy(np.array(image)).float().div(255)[None], torch.tensor(label)
        return image, label


def test_from_dataset(shared_data, tmp_path):
    chosen = drawings(shared_data, 2, 3, 4)
    members = [m for files in chosen.values() for m in files]
    members = members[1::2] + members[::2]  # not grouped by class: from_dataset groups them
    ds = ZipOmniglot(shared_data / ZIP, members)
    data = ClassImages.from_dataset(ds)
    assert data.n_classes == 6 and data.class_names == tuple(ds.classes) and (data.counts == 4).all()
    assert data.image_shape == (1, 105, 105) and data.info["dataset"] == "ZipOmniglot"
    with zipfile.ZipFile(shared_data / ZIP) as zf:  # class 0's first drawing, as Pillow decodes it
        first = next(m for m in members if ds.classes.index(m.rsplit("/", 1)[0].split("/", 1)[1]) == 0)
        expect = np.array(Image.open(io.BytesIO(zf.read(first))).convert("L"))
    assert torch.equal(data.images[0, 0], torch.from_numpy(expect))
    for form in ("array", "tensor"):  # numpy and ToTensor-style items give the same images
        same = ClassImages.from_dataset(ZipOmniglot(shared_data / ZIP, members, form))
        assert torch.equal(same.images, data.images) and same.class_names == data.class_names

    small = ClassImages.from_dataset(ds, image_size=28, channels=3)
    assert small.image_shape == (3, 28, 28)
    assert torch.equal(small.images[0, 0], torch.from_numpy(decode_image(zipfile.ZipFile(shared_data / ZIP).read(first),
                                                                         (28, 28), "L", first)[0]))
    batch = EpisodeSampler(small, EpisodeConfig(n_way=5, k_shot=1, q_query=3)).episodes(0, [0, 1])
    assert batch.x_support.shape == (2, 5, 3, 28, 28)

    class Mixed(torch.utils.data.Dataset):  # sizes differ and labels are strings: both refused clearly
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    with pytest.raises(DataError, match=r"item 1 of Mixed has shape \(1, 28, 28\) .* pass image_size="):
        ClassImages.from_dataset(Mixed([(ds[0][0], 0), (ds[1][0].resize((28, 28)), 1)]))
    with pytest.raises(DataError, match=r"item 0: the label must be an integer class index, got 'a'"):
        ClassImages.from_dataset(Mixed([(ds[0][0], "a")]))


def test_data_section_round_trip_and_old_configs(tmp_path):
    cfg = MetaLearningFullConfig.minimal().with_overrides(
        ["episodes.dataset=custom", "data.image_size=28", "data.channels=1", "data.class_depth=2"])
    assert (cfg.data.image_size, cfg.data.channels, cfg.data.class_depth) == (28, 1, 2)
    for suffix in (".yaml", ".json"):
        cfg.save(tmp_path / f"c{suffix}")
        assert MetaLearningFullConfig.load(tmp_path / f"c{suffix}") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["data"] == {"image_size": 28, "channels": 1, "class_depth": 2}
    with pytest.raises(ConfigError, match=r"DataConfig.channels: must be 1, 3 or null, got 2"):
        cfg.with_overrides(["data.channels=2"])
    with pytest.raises(ConfigError, match=r"DataConfig.image_size: must be an integer or null, got 'big'"):
        cfg.with_overrides(["data.image_size=big"])

    old = MetaLearningFullConfig.minimal().to_dict()
    del old["data"]  # a config file or checkpoint from before the data section
    assert MetaLearningFullConfig.from_dict(old).data == MetaLearningFullConfig().data
    assert config_differences(old, MetaLearningFullConfig.minimal().to_dict()) == []
    assert config_differences(old, MetaLearningFullConfig.minimal().with_overrides(["data.image_size=20"]).to_dict()) \
        == ["data.image_size: checkpoint None != now 20"]


def test_trainer_on_a_nested_folder_dataset_with_data_image_size(shared_data, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    make_nested(shared_data, root, alphabets=3, characters=9, per_character=6, odd_size=90)  # 27 classes
    monkeypatch.setenv("META_KERNELS_CACHE", str(tmp_path / "c"))
    cfg = MetaLearningFullConfig.minimal().with_overrides(
        ["episodes.dataset=custom", f"run.data_root={root}", "data.class_depth=2", "data.image_size=28",
         "data.channels=1", "run.val_every=2"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.data["train"].image_shape == (1, 28, 28) and "/" in trainer.data["train"].class_names[0]
    summary = trainer.fit(max_steps=2)
    assert summary["global_step"] == 2 and summary["last_val"] is not None
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]["data"]["image_size"] == 28
    with pytest.raises(CheckpointError, match=r"data.image_size: checkpoint 28 != now 32"):
        Trainer(cfg.with_overrides(["data.image_size=32"]), tmp_path / "run", resume=True, progress=False)
