"""The `custom` dataset: a folder with one sub-folder of images per class.

Either root/<class>/<image> (classes are split into train/val/test by a seeded permutation) or
root/{train,val,test}/<class>/<image> (the split is given; the folders must not share a class).
With class_depth=d, class folders are nested d levels deep (d=2: root/<alphabet>/<character>/
<image>) and a class is named by its relative path ('alphabet/character').
Every non-hidden file in a class folder must be an image; files above the class folders (a
README, a licence) are ignored. A split is decoded once and cached.
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import SPLITS, ClassImages, DataError, assign_splits, check_split, decode_many
from .cache import cache_key, cached, listing_fingerprint


def _subdirs(path: Path) -> list[Path]:
    # Hidden entries (.git, .DS_Store, editor files) are never data.
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_dirs(base: Path, depth: int) -> list[Path]:
    """The folders `depth` levels below base, sorted by relative path. A branch that ends above
    that depth is an error: its images would silently be left out."""
    level = [base]
    for d in range(1, depth + 1):
        below = []
        for p in level:
            subs = _subdirs(p)
            if not subs and p != base:
                raise DataError(f"{p} has no sub-folders, but data.class_depth={depth} puts the class folders "
                                f"{depth} levels below {base}; set data.class_depth={d - 1} (class_depth=) to match "
                                f"where the images are")
            below += subs
        level = below
    return level


def _class_files(folder: Path, depth: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not files:
        raise DataError(f"class folder {folder} holds no images; add images or remove the folder")
    for p in files:
        if not p.is_file():
            raise DataError(f"{p} is not an image file: class folders hold images only, and with "
                            f"data.class_depth={depth} the class folders are {depth} level(s) below the root; for "
                            f"nested classes raise data.class_depth (class_depth=)")
    return files


def load_folder(root: str | os.PathLike, split: str = "train", *, image_size: int | tuple[int, int] | None = None,
                mode: str = "RGB", val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0,
                cache_dir: str | os.PathLike | None = None, class_depth: int = 1) -> ClassImages:
    """One split of a class-folder dataset as ClassImages. image_size: (H, W) or one int for a
    square; None keeps the files' size, which must then be the same for all. mode: a Pillow mode,
    'RGB' (3 channels) or 'L' (1). class_depth: how many levels below root (or below
    root/<split>/) the class folders are."""
    check_split(split)
    if root is None:
        raise DataError("the custom dataset needs root=<folder with one sub-folder per class>")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found or not a folder")
    if not isinstance(class_depth, int) or class_depth < 1:
        raise DataError(f"class_depth must be an integer >= 1, got {class_depth!r}")
    top = _subdirs(root)
    if not top:
        raise DataError(f"{root} has no class sub-folders; put the images of each class in root/<class>/")
    if {p.name for p in top} <= set(SPLITS):  # pre-split layout
        by_split = {p.name: [c.relative_to(p).as_posix() for c in _class_dirs(p, class_depth)] for p in top}
        owner = {}
        for s, names in by_split.items():
            for c in names:
                if c in owner:
                    raise DataError(f"class {c!r} is in both {root / owner[c]} and {root / s}: splits must be "
                                    f"class-disjoint (split on classes, never on images)")
                owner[c] = s
        if split not in by_split:
            raise DataError(f"{root} is split into {', '.join(sorted(by_split))} folders but has no {split}/")
        base = root / split
        classes = _class_dirs(base, class_depth)
    else:
        base = root
        every = _class_dirs(root, class_depth)
        assignment = assign_splits([p.relative_to(root).as_posix() for p in every], val_fraction, test_fraction,
                                   split_seed)
        classes = [p for p in every if assignment[p.relative_to(root).as_posix()] == split]
    if not classes:
        raise DataError(f"the {split} split of {root} has no classes; add class folders or change the fractions")

    per_class = [_class_files(c, class_depth) for c in classes]
    files = [p for fs in per_class for p in fs]
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    key = cache_key(root=str(root.resolve()), listing=listing_fingerprint(root, files), size=size, mode=mode)

    def build():
        return {"images": decode_many([(str(p), lambda p=p: p) for p in files], size, mode)}

    images = cached(cache_dir, f"folder-{root.name}-{split}", key, build)["images"]
    labels = [i for i, fs in enumerate(per_class) for _ in fs]
    info = dict(dataset="custom", split=split, root=str(root), image_size=size, mode=mode,
                val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)
    if class_depth != 1:  # recorded only when set, so runs from before it keep their data fingerprint
        info["class_depth"] = class_depth
    return ClassImages.from_labels(images, labels, [c.relative_to(base).as_posix() for c in classes], info)
