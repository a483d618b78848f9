"""Omniglot: the real background-small zips (cold decode, then warm from the cache), the full
layout's standard split on a generated stand-in, download and every bad-archive error."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest_data import shared_data  # noqa: F401  (fixture)
from meta_kernels.config import EpisodeConfig
from meta_kernels.data import DataError, EpisodeSampler, download_omniglot, load_dataset, load_omniglot, verify_archive
from meta_kernels.data import omniglot as omniglot_module

SMALL = ("images_background_small1", "images_background_small2")


@pytest.fixture(scope="module")
def root(shared_data) -> Path:
    return shared_data / "omniglot"


@pytest.fixture(scope="module")
def warm_cache(root, tmp_path_factory) -> Path:
    """A cache dir filled by one cold load (shared by the tests, which then load warm)."""
    cache = tmp_path_factory.mktemp("omniglot_cache")
    load_omniglot(root, "train", variant="small", cache_dir=cache)
    return cache


def no_decoding(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("decoded although the cache should have served")
    monkeypatch.setattr(omniglot_module, "decode_many", fail)


def base_char(name: str) -> str:
    return name.rsplit("/", 1)[0]  # 'Alphabet/character/rot90' -> 'Alphabet/character'


def test_cold_load_then_warm_from_cache(root, tmp_path, monkeypatch):
    cold = load_omniglot(root, "train", variant="small", cache_dir=tmp_path)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and all(n.startswith("omniglot-images_background_small") and n.endswith(".pt")
                                    for n in cached)  # one file per source, no temp files
    no_decoding(monkeypatch)
    warm = load_omniglot(root, "train", variant="small", cache_dir=tmp_path)
    assert torch.equal(warm.images, cold.images) and warm.class_names == cold.class_names
    assert cold.images.dtype == torch.uint8 and cold.image_shape == (1, 28, 28)
    assert cold.info["sources"]["images_background_small1"] == omniglot_module.EXPECTED[SMALL[0]]["sha256"]


def test_small_splits_are_class_disjoint_and_complete(root, warm_cache, monkeypatch):
    no_decoding(monkeypatch)
    for split_by in ("alphabet", "character"):
        parts = {s: load_omniglot(root, s, variant="small", split_by=split_by, cache_dir=warm_cache)
                 for s in ("train", "val", "test")}
        chars = {s: {base_char(c) for c in d.class_names} for s, d in parts.items()}
        alphabets = {s: {c.split("/")[0] for c in cs} for s, cs in chars.items()}
        assert not chars["train"] & chars["val"] and not chars["train"] & chars["test"] and not chars["val"] & chars["test"]
        # 8 alphabets (Greek and Latin are in both small zips, counted once), 242 characters.
        assert len(set().union(*chars.values())) == 242
        assert len(set().union(*alphabets.values())) == 8
        if split_by == "alphabet":
            assert [len(alphabets[s]) for s in ("train", "val", "test")] == [4, 2, 2]
            assert not alphabets["train"] & alphabets["val"] and not alphabets["train"] & alphabets["test"]
        for d in parts.values():  # 4 rotations x 20 drawings per character
            assert d.n_classes == 4 * len({base_char(c) for c in d.class_names}) and (d.counts == 20).all()


def test_images_are_28px_ink_on_black_and_rotations_are_classes(root, warm_cache):
    d = load_omniglot(root, "val", variant="small", cache_dir=warm_cache)
    assert d.class_names[0].endswith("/rot0") and d.class_names[1].endswith("/rot90")
    assert torch.equal(d.images[d.offsets[1]], torch.rot90(d.images[d.offsets[0]], 1, (1, 2)))
    mean = d.images.float().mean() / 255
    assert 0.02 < mean < 0.4  # strokes are the minority, as ink
    assert d.images[:, :, 0, 0].float().mean() < 10  # corners are background
    plain = load_omniglot(root, "val", variant="small", cache_dir=warm_cache, rotations=False)
    assert plain.n_classes * 4 == d.n_classes


def test_real_episodes(root, warm_cache):
    d = load_dataset("omniglot", root, "train", variant="small", cache_dir=warm_cache)
    s = EpisodeSampler(d, EpisodeConfig(n_way=5, k_shot=1, q_query=15, episodes_per_epoch=64), seed=3)
    b = s.meta_batch(0, 0, 32)
    assert b.x_support.shape == (32, 5, 1, 28, 28) and b.x_query.shape == (32, 75, 1, 28, 28)
    assert 0.0 <= b.x_query.min() and b.x_query.max() <= 1.0
    with pytest.raises(DataError, match=r"fewer than k_shot \+ q_query = 21 images: 'Balinese/character01/rot0' \(20\)"):
        EpisodeSampler(d, EpisodeConfig(n_way=5, k_shot=5, q_query=16))
    with pytest.raises(DataError, match=r"n_way=2000 is larger than the \d+ classes of the omniglot train split"):
        EpisodeSampler(d, EpisodeConfig(n_way=2000))


def test_unpacked_folder_reads_like_the_zip(root, warm_cache, tmp_path):
    with zipfile.ZipFile(root / f"{SMALL[0]}.zip") as zf:
        zf.extractall(tmp_path)
    (tmp_path / f"{SMALL[1]}.zip").symlink_to(root / f"{SMALL[1]}.zip")
    from_folder = load_omniglot(tmp_path, "test", variant="small", cache_dir=warm_cache)
    from_zip = load_omniglot(root, "test", variant="small", cache_dir=warm_cache)
    assert from_folder.class_names == from_zip.class_names and torch.equal(from_folder.images, from_zip.images)


def write_png_tree(base: Path, name: str, alphabets: int, chars: int, drawings: int) -> None:
    rng = np.random.default_rng(len(name) + alphabets)
    for a in range(alphabets):
        for c in range(chars):
            d = base / name / f"{name[7:10]}Alpha{a:02d}" / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            for i in range(drawings):
                img = (rng.random((105, 105)) > 0.1).astype(np.uint8) * 255  # white paper, black ink
                Image.fromarray(img).convert("1").save(d / f"{a:02d}{c:02d}_{i:02d}.png")


def test_full_layout_uses_the_standard_split(tmp_path):
    """A stand-in with the full set's layout (30 background, 20 evaluation alphabets)."""
    write_png_tree(tmp_path, "images_background", 30, 2, 2)
    write_png_tree(tmp_path, "images_evaluation", 20, 2, 2)
    cache = tmp_path / "cache"
    parts = {s: load_omniglot(tmp_path, s, cache_dir=cache, rotations=False) for s in ("train", "val", "test")}
    alph = {s: {c.split("/")[0] for c in d.class_names} for s, d in parts.items()}
    assert all(a.startswith("evaAlpha") for a in alph["test"]) and len(alph["test"]) == 20
    assert all(a.startswith("bacAlpha") for a in alph["train"] | alph["val"])
    assert (len(alph["train"]), len(alph["val"])) == (24, 6) and not alph["train"] & alph["val"]
    with pytest.raises(DataError, match="test_fraction applies to variant='small' only"):
        load_omniglot(tmp_path, "test", test_fraction=0.1, cache_dir=cache)
    # A changed source is decoded again, never served from a stale cache entry.
    extra = tmp_path / "images_evaluation" / "evaAlpha00" / "character01" / "0000_99.png"
    Image.new("1", (105, 105), 1).save(extra)
    assert load_omniglot(tmp_path, "test", cache_dir=cache, rotations=False).images.shape[0] == 81


def test_missing_archives_say_what_to_put_where(root, tmp_path):
    with pytest.raises(DataError) as e:
        load_omniglot(tmp_path, "train", variant="small", cache_dir=tmp_path / "c")
    msg = str(e.value)
    for n in SMALL:
        assert f"{omniglot_module.OMNIGLOT_URL}{n}.zip -> {tmp_path / (n + '.zip')}" in msg
    assert "download=True" in msg
    with pytest.raises(DataError, match=r"needs images_background.zip, images_evaluation.zip in .*variant='small' uses them"):
        load_omniglot(root, "train", variant="full")


def test_corrupt_archives_name_the_file_and_leave_no_cache(root, tmp_path):
    cache = tmp_path / "cache"
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / f"{SMALL[0]}.zip").write_bytes(b"this is not a zip file" * 100)
    (bad / f"{SMALL[1]}.zip").symlink_to(root / f"{SMALL[1]}.zip")
    with pytest.raises(DataError, match=rf"{bad / SMALL[0]}.zip is not a valid zip archive"):
        load_omniglot(bad, "train", variant="small", cache_dir=cache)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (root / f"{SMALL[0]}.zip").read_bytes()
    (truncated / f"{SMALL[0]}.zip").write_bytes(data[: len(data) // 2])
    (truncated / f"{SMALL[1]}.zip").symlink_to(root / f"{SMALL[1]}.zip")
    with pytest.raises(DataError, match=rf"{truncated / SMALL[0]}.zip is not a valid zip archive"):
        load_omniglot(truncated, "train", variant="small", cache_dir=cache)

    # A readable zip with one damaged drawing: the error names archive and member, and the
    # half-done decode leaves nothing in the cache.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    with zipfile.ZipFile(root / f"{SMALL[0]}.zip") as src, zipfile.ZipFile(damaged / f"{SMALL[0]}.zip", "w") as dst:
        victim = sorted(m for m in src.namelist() if m.endswith(".png"))[100]
        for m in src.namelist():
            dst.writestr(m, b"\x89PNG garbage" if m == victim else src.read(m))
    (damaged / f"{SMALL[1]}.zip").symlink_to(root / f"{SMALL[1]}.zip")
    with pytest.raises(DataError, match=rf"{damaged / SMALL[0]}.zip:{victim} is not a readable image"):
        load_omniglot(damaged, "train", variant="small", cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_verify_archive(root, tmp_path):
    for n in SMALL:
        verify_archive(root / f"{n}.zip", n)
    renamed = tmp_path / "images_background.zip"
    renamed.symlink_to(root / f"{SMALL[0]}.zip")
    with pytest.raises(DataError, match=rf"{renamed} is not an Omniglot images_background archive: expected "
                                        rf"images_background/<Alphabet>/<character>/<file>.png entries"):
        verify_archive(renamed, "images_background")

    def fake_evaluation(alphabets: int) -> Path:
        path = tmp_path / f"{alphabets}" / "images_evaluation.zip"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as zf:
            for i in range(13180):  # 659 characters of 20 drawings, spread over the alphabets
                c = i // 20
                zf.writestr(f"images_evaluation/A{c % alphabets:02d}/c{c:03d}/{i}.png", b"")
        return path
    with pytest.raises(DataError, match="holds 19 alphabets, the official images_evaluation.zip holds 20"):
        verify_archive(fake_evaluation(19), "images_evaluation")
    # Right structure, wrong bytes: the checksum catches it.
    with pytest.raises(DataError, match="has md5 [0-9a-f]{32}, the official images_evaluation.zip has 6b91aef0"):
        verify_archive(fake_evaluation(20), "images_evaluation")
    # A repacked small zip holding the same drawings differs in bytes.
    repacked = tmp_path / f"{SMALL[0]}.zip"
    with zipfile.ZipFile(root / f"{SMALL[0]}.zip") as src, zipfile.ZipFile(repacked, "w") as dst:
        for m in src.namelist():
            dst.writestr(m, src.read(m))
    with pytest.raises(DataError, match=rf"{repacked} has \d+ bytes, the official {SMALL[0]}.zip has 1319022"):
        verify_archive(repacked, SMALL[0])


def test_download_verifies_and_leaves_nothing_unverified(root, tmp_path, warm_cache, monkeypatch):
    mirror = root.as_uri() + "/"
    got = download_omniglot(tmp_path / "dl", SMALL[:1], base_url=mirror)
    assert got == [tmp_path / "dl" / f"{SMALL[0]}.zip"] and got[0].read_bytes() == (root / got[0].name).read_bytes()

    bad_mirror = tmp_path / "bad_mirror"
    bad_mirror.mkdir()
    (bad_mirror / f"{SMALL[1]}.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip archive"):
        download_omniglot(tmp_path / "dl2", SMALL[1:], base_url=bad_mirror.as_uri() + "/")
    assert list((tmp_path / "dl2").iterdir()) == []  # no partial or unverified file

    with pytest.raises(DataError) as e:  # offline: nothing listens on port 9 here
        download_omniglot(tmp_path / "dl3", ["images_background"], base_url="http://127.0.0.1:9/")
    assert (f"without a network, download {omniglot_module.OMNIGLOT_URL}images_background.zip -> "
            f"{tmp_path / 'dl3' / 'images_background.zip'}") in str(e.value)
    assert list((tmp_path / "dl3").iterdir()) == []

    # load_omniglot(download=True) fetches what is missing, then loads it.
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_URL", mirror)
    d = load_omniglot(tmp_path / "auto", "val", variant="small", download=True, cache_dir=warm_cache)
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == [f"{n}.zip" for n in SMALL] and d.n_classes > 0
