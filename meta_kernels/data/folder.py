"""The `custom` dataset: a folder with one sub-folder of images per class.

Either root/<class>/<image> (classes are split into train/val/test by a seeded permutation) or
root/{train,val,test}/<class>/<image> (the split is given; the folders must not share a class).
Every non-hidden file in a class folder must be an image; files directly in root (a README, a
licence) are ignored. A split is decoded once and cached.
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import SPLITS, ClassImages, DataError, assign_splits, check_split, decode_many
from .cache import cache_key, cached, listing_fingerprint


def _subdirs(path: Path) -> list[Path]:
    # Hidden entries (.git, .DS_Store, editor files) are never data.
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not files:
        raise DataError(f"class folder {folder} holds no images; add images or remove the folder")
    for p in files:
        if not p.is_file():
            raise DataError(f"{p} is not an image file: class folders hold images only (no nested folders)")
    return files


def load_folder(root: str | os.PathLike, split: str = "train", *, image_size: int | tuple[int, int] | None = None,
                mode: str = "RGB", val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0,
                cache_dir: str | os.PathLike | None = None) -> ClassImages:
    """One split of a class-folder dataset as ClassImages. image_size: (H, W) or one int for a
    square; None keeps the files' size, which must then be the same for all. mode: a Pillow mode,
    'RGB' (3 channels) or 'L' (1)."""
    check_split(split)
    if root is None:
        raise DataError("the custom dataset needs root=<folder with one sub-folder per class>")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found or not a folder")
    top = _subdirs(root)
    if not top:
        raise DataError(f"{root} has no class sub-folders; put the images of each class in root/<class>/")
    if {p.name for p in top} <= set(SPLITS):  # pre-split layout
        by_split = {p.name: [c.name for c in _subdirs(p)] for p in top}
        owner = {}
        for s, names in by_split.items():
            for c in names:
                if c in owner:
                    raise DataError(f"class {c!r} is in both {root / owner[c]} and {root / s}: splits must be "
                                    f"class-disjoint (split on classes, never on images)")
                owner[c] = s
        if split not in by_split:
            raise DataError(f"{root} is split into {', '.join(sorted(by_split))} folders but has no {split}/")
        classes = _subdirs(root / split)
    else:
        assignment = assign_splits([p.name for p in top], val_fraction, test_fraction, split_seed)
        classes = [p for p in top if assignment[p.name] == split]
    if not classes:
        raise DataError(f"the {split} split of {root} has no classes; add class folders or change the fractions")

    per_class = [_class_files(c) for c in classes]
    files = [p for fs in per_class for p in fs]
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    key = cache_key(root=str(root.resolve()), listing=listing_fingerprint(root, files), size=size, mode=mode)

    def build():
        return {"images": decode_many([(str(p), lambda p=p: p) for p in files], size, mode)}

    images = cached(cache_dir, f"folder-{root.name}-{split}", key, build)["images"]
    labels = [i for i, fs in enumerate(per_class) for _ in fs]
    info = dict(dataset="custom", split=split, root=str(root), image_size=size, mode=mode,
                val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)
    return ClassImages.from_labels(images, labels, [c.name for c in classes], info)
