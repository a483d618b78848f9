"""Omniglot from the official files of github.com/brendenlake/omniglot (python/ folder).

`variant="full"`: images_background (30 alphabets, 964 characters) for train/val and
images_evaluation (20 alphabets, 659 characters) for test: the standard split.
`variant="small"`: images_background_small1/2 (the minimal background sets, 5 alphabets each;
Greek and Latin are in both, identical, and are counted once), split by alphabet or character.

Each source is a zip or its unpacked folder (`<name>/<Alphabet>/<character>/<drawing>.png`), in
the dataset folder. It is decoded once to 28x28 uint8 (ink = 255) and cached; 90-degree
rotations are added as new classes after the split, so a character's rotations share its split.

`scheme="vinyals"` (full variant only): the split of Vinyals et al. 2016, used by MAML, Reptile
and MAML++: the 1623 characters of both sets (964 + 659) in one fixed order, sorted by
'Alphabet/character' name (alphabets A-Z across both sets, the order of the widely used split
files of Snell et al.'s prototypical networks, whose test set starts inside Gurmukhi); the first
1200 are for training, the other 423 for test. The library validates during training, so
val_fraction of the 1200 (a seeded choice by split_seed; 240 at the default 0.2) is carved out
as val: train + val = the 1200 (Vinyals et al. had no validation set).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch

from .base import ClassImages, DataError, assign_splits, check_split, decode_many, resolve_root
from .cache import cache_key, cached, file_sha256, listing_fingerprint

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
VARIANTS = {"full": ("images_background", "images_evaluation"),
            "small": ("images_background_small1", "images_background_small2")}
SCHEMES = ("default", "vinyals")  # how classes are split (module docstring)
VINYALS_TRAIN_CHARACTERS = 1200  # of 1623; the other 423 are the test split

# What a genuine file holds. Small zips: size and sha256 measured on the official copies in
# ../shared/data. Full zips: no copy was at hand to measure, so they are checked by structure
# (a readable zip, top folder <name>/, the known alphabet, character and drawing counts of the
# Omniglot paper's background/evaluation sets) and by the md5 that torchvision's Omniglot
# class publishes for them (torchvision/datasets/omniglot.py, `zips_md5`), not re-measured here.
EXPECTED = {
    "images_background_small1": dict(size=1319022, alphabets=5, characters=136, drawings=2720,
                                     sha256="f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"),
    "images_background_small2": dict(size=1580917, alphabets=5, characters=156, drawings=3120,
                                     sha256="3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"),
    "images_background": dict(alphabets=30, characters=964, drawings=19280, md5="68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": dict(alphabets=20, characters=659, drawings=13180, md5="6b91aef0f799c5bb55b94e3f2daec811"),
}
TRANSFORM = "L,lanczos,invert"  # part of the cache key: change it when decoding changes


def _placement_help(root: Path, names) -> str:
    where = "; ".join(f"{OMNIGLOT_URL}{n}.zip -> {root / (n + '.zip')}" for n in names)
    return (f"download {where} (or unpack each zip there, giving folders {', '.join(str(root / n) for n in names)}), "
            f"or call with download=True where a network is available")


def _members(zf: zipfile.ZipFile, name: str, path: Path) -> list[str]:
    """The drawing files of an Omniglot zip: <name>/<Alphabet>/<character>/<file>.png."""
    members = sorted(m for m in zf.namelist() if m.endswith(".png"))
    bad = [m for m in members if len(m.split("/")) != 4 or m.split("/")[0] != name]
    if not members or bad:
        raise DataError(f"{path} is not an Omniglot {name} archive: expected {name}/<Alphabet>/<character>/<file>.png "
                        f"entries, found {(bad or zf.namelist() or ['nothing'])[0]!r}; replace the file")
    return members


def verify_archive(path: Path, name: str) -> None:
    """Raise DataError unless `path` is the genuine Omniglot `<name>.zip` (see EXPECTED). The
    structure is checked first: its errors say more than a checksum mismatch."""
    exp = EXPECTED[name]
    try:
        with zipfile.ZipFile(path) as zf:
            members = _members(zf, name, path)
    except zipfile.BadZipFile as e:
        raise DataError(f"{path} is not a valid zip archive ({e}); delete it and download it again") from e
    found = dict(alphabets=len({m.split("/")[1] for m in members}),
                 characters=len({tuple(m.split("/")[1:3]) for m in members}), drawings=len(members))
    for k, v in found.items():
        if v != exp[k]:
            raise DataError(f"{path} holds {v} {k}, the official {name}.zip holds {exp[k]}; replace the file")
    if "size" in exp and path.stat().st_size != exp["size"]:
        raise DataError(f"{path} has {path.stat().st_size} bytes, the official {name}.zip has {exp['size']}; "
                        f"delete it and download it again")
    for algo in ("sha256", "md5"):
        if algo in exp:
            digest = file_sha256(path) if algo == "sha256" else hashlib.md5(path.read_bytes()).hexdigest()
            if digest != exp[algo]:
                raise DataError(f"{path} has {algo} {digest}, the official {name}.zip has {exp[algo]}; "
                                f"delete it and download it again")


def download_omniglot(root: str | os.PathLike, names=VARIANTS["full"], base_url: str | None = None,
                      timeout: float = 60.0) -> list[Path]:
    """Download the named official zips into root (skipping verified ones already there) from
    base_url (default OMNIGLOT_URL). Each is fetched to a temp file, verified, then renamed:
    nothing unverified is left at its place."""
    root = Path(root).expanduser()
    base_url = OMNIGLOT_URL if base_url is None else base_url
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        dest = root / f"{name}.zip"
        if not dest.exists():
            url = f"{base_url}{name}.zip"
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                verify_archive(Path(tmp), name)
                os.replace(tmp, dest)
            except (urllib.error.URLError, OSError) as e:
                os.unlink(tmp)
                raise DataError(f"could not download {url} ({e}); without a network, {_placement_help(root, [name])}") from e
            except BaseException:
                os.unlink(tmp)
                raise
        verify_archive(dest, name)
        paths.append(dest)
    return paths


def _decoded(root: Path, name: str, image_size: int, cache_dir) -> dict:
    """{"images": uint8 [M, 1, S, S], "files": ['Alphabet/character/file.png', ...]} of one source,
    from the cache or decoded (zip preferred over folder when both are there)."""
    zpath, folder = root / f"{name}.zip", root / name
    if zpath.is_file():
        checksum = file_sha256(zpath)

        def build():
            try:
                with zipfile.ZipFile(zpath) as zf:
                    members = _members(zf, name, zpath)
                    images = decode_many([(f"{zpath}:{m}", lambda m=m: zf.read(m)) for m in members],
                                         (image_size, image_size), "L")
            except zipfile.BadZipFile as e:
                raise DataError(f"{zpath} is not a valid zip archive ({e}); delete it and download it again") from e
            return {"images": 255 - images, "files": [m.split("/", 1)[1] for m in members]}
    elif folder.is_dir():
        files = sorted(p for p in folder.glob("*/*/*.png"))
        if not files:
            raise DataError(f"{folder} holds no <Alphabet>/<character>/<file>.png drawings; unpack {name}.zip "
                            f"so that {folder}/<Alphabet>/<character>/ holds the PNGs")
        checksum = listing_fingerprint(folder, files)

        def build():
            images = decode_many([(str(p), lambda p=p: p.read_bytes()) for p in files], (image_size, image_size), "L")
            return {"images": 255 - images, "files": [p.relative_to(folder).as_posix() for p in files]}
    else:
        raise DataError(f"Omniglot file {zpath} not found (nor the unpacked folder {folder}); "
                        f"{_placement_help(root, [name])}")
    key = cache_key(source=name, checksum=checksum, size=image_size, transform=TRANSFORM)
    obj = cached(cache_dir, f"omniglot-{name}-{image_size}", key, build)
    return {**obj, "checksum": checksum}


def load_omniglot(root: str | os.PathLike | None = None, split: str = "train", *, variant: str = "full",
                  image_size: int = 28, rotations: bool = True, split_by: str = "alphabet",
                  val_fraction: float = 0.2, test_fraction: float | None = None, split_seed: int = 0,
                  cache_dir: str | os.PathLike | None = None, download: bool = False,
                  scheme: str = "default") -> ClassImages:
    """One split of Omniglot as ClassImages; classes are characters ('Alphabet/character', with
    '/rot<angle>' when rotations=True). split_by ('alphabet' or 'character') is the unit kept
    whole within a split; val_fraction of the units go to val (of the background set for
    'full'); test_fraction (small variant only, default 0.2) to test. scheme='vinyals': the
    1200 / 423-character split (module docstring; full variant, split by character)."""
    check_split(split)
    if variant not in VARIANTS:
        raise DataError(f"unknown Omniglot variant {variant!r}; choose 'full' or 'small'")
    if scheme not in SCHEMES:
        raise DataError(f"unknown Omniglot split scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "vinyals" and variant != "full":
        raise DataError("scheme='vinyals' splits the 1623 characters of the full set: use variant='full'")
    if split_by not in ("alphabet", "character"):
        raise DataError(f"split_by must be 'alphabet' or 'character', got {split_by!r}")
    if variant == "full" and test_fraction is not None:
        raise DataError("test_fraction applies to variant='small' only: the full set's test split is the 20 "
                        "evaluation alphabets")
    root = resolve_root("omniglot", root)
    names = VARIANTS[variant]
    missing = [n for n in names if not (root / f"{n}.zip").is_file() and not (root / n).is_dir()]
    if missing and download:
        download_omniglot(root, missing)
    elif missing:
        small = variant == "full" and all((root / f"{n}.zip").is_file() for n in VARIANTS["small"])
        raise DataError(f"Omniglot ({variant}) needs {', '.join(n + '.zip' for n in missing)} in {root}: "
                        f"{_placement_help(root, missing)}"
                        + ("; the small background sets are there: variant='small' uses them" if small else ""))

    # Merge the sources, each drawing once: the small sets share Greek and Latin.
    parts, files, origin, seen, checksums = [], [], [], {}, {}
    for name in names:
        obj = _decoded(root, name, image_size, cache_dir)
        checksums[name] = obj["checksum"]
        keep = []
        for i, (f, img) in enumerate(zip(obj["files"], obj["images"])):
            if f not in seen:
                seen[f] = img
                keep.append(i)
            elif not torch.equal(seen[f], img):
                raise DataError(f"drawing {f} differs between the Omniglot sources {', '.join(names)} in {root}; "
                                f"one of them is damaged: replace it")
        parts.append(obj["images"][keep])
        files += [obj["files"][i] for i in keep]
        origin += [name] * len(keep)

    chars = [f.rsplit("/", 1)[0] for f in files]
    class_names = sorted(set(chars))
    class_of = {c: i for i, c in enumerate(class_names)}
    class_origin = dict(zip(chars, origin))
    unit = (lambda c: c.split("/")[0]) if split_by == "alphabet" else (lambda c: c)
    if scheme == "vinyals":
        if len(class_names) != 964 + 659:  # the split is defined by counts: refuse a partial set
            raise DataError(f"the Vinyals split needs the 1623 characters of the full Omniglot set (964 + 659), "
                            f"found {len(class_names)} in {root}; use the official zips")
        # class_names is sorted by 'Alphabet/character' across both sets: the fixed order.
        first = class_names[:VINYALS_TRAIN_CHARACTERS]
        units = assign_splits(first, val_fraction, 0.0, split_seed)
        assignment = {c: units.get(c, "test") for c in class_names}
    elif variant == "full":  # evaluation alphabets are the test split; val is carved from background
        background = [c for c in class_names if class_origin[c] == "images_background"]
        units = assign_splits([unit(c) for c in background], val_fraction, 0.0, split_seed)
        assignment = {c: units[unit(c)] if class_origin[c] == "images_background" else "test" for c in class_names}
    else:
        units = assign_splits([unit(c) for c in class_names], val_fraction,
                              0.2 if test_fraction is None else test_fraction, split_seed)
        assignment = {c: units[unit(c)] for c in class_names}
    in_split = [class_of[c] for c in class_names if assignment[c] == split]
    if not in_split:
        raise DataError(f"the Omniglot ({variant}) {split} split is empty with val_fraction={val_fraction}; "
                        f"raise the fraction for this split")
    info = dict(dataset="omniglot", variant=variant, split=split, sources=checksums, image_size=image_size,
                transform=TRANSFORM, split_by=split_by, val_fraction=val_fraction, test_fraction=test_fraction,
                split_seed=split_seed)
    if scheme != "default":  # only then: the default's info (a resume fingerprint) stays as it was
        info["scheme"] = scheme
    data = ClassImages.from_labels(torch.cat(parts), [class_of[c] for c in chars], class_names, info)
    data = data.select(in_split)
    return data.with_rotations() if rotations else data

