"""mini-ImageNet with the Ravi & Larochelle (2017) split: 64 / 16 / 20 classes of 600 images.

The dataset folder holds the split files train.csv, val.csv, test.csv (`filename,label`) and
images/ with the files they name. A split is decoded once to 84x84 RGB uint8 and cached.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .base import ClassImages, DataError, SPLITS, check_split, decode_many, resolve_root
from .cache import cache_key, cached, file_sha256, listing_fingerprint

TRANSFORM = "RGB,lanczos"  # part of the cache key: change it when decoding changes


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of a split file, checked for the `filename,label` layout."""
    if not path.is_file():
        raise DataError(f"mini-ImageNet split file {path} not found: put the Ravi & Larochelle split files "
                        f"{', '.join(s + '.csv' for s in SPLITS)} in {path.parent}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path} must start with the header 'filename,label', got {rows[0] if rows else 'an empty file'}")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not all(c.strip() for c in row):
            raise DataError(f"{path} line {line}: expected 'filename,label', got {','.join(row)!r}")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{path} lists no images")
    return out


def load_mini_imagenet(root: str | os.PathLike | None = None, split: str = "train", *, image_size: int = 84,
                       images_dir: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike | None = None) -> ClassImages:
    """One split as ClassImages (classes are the WordNet ids, sorted). images_dir defaults to
    <root>/images. The split files present must name disjoint classes."""
    check_split(split)
    root = resolve_root("mini_imagenet", root)
    csv_path = root / f"{split}.csv"
    rows = read_split_csv(csv_path)
    labels = {lab for _, lab in rows}
    for other in SPLITS:  # a class in two splits would leak test classes into training
        if other != split and (root / f"{other}.csv").is_file():
            shared = labels & {lab for _, lab in read_split_csv(root / f"{other}.csv")}
            if shared:
                raise DataError(f"{csv_path} and {other}.csv share classes {sorted(shared)[:3]}: splits must be "
                                f"class-disjoint; use the Ravi & Larochelle split files")
    images_dir = Path(images_dir) if images_dir is not None else root / "images"
    files = [images_dir / name for name, _ in rows]
    if not images_dir.is_dir():
        raise DataError(f"mini-ImageNet image folder {images_dir} not found: put the images named in {csv_path} "
                        f"(e.g. {rows[0][0]}) there, or pass images_dir=")
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) listed in {csv_path} are missing from {images_dir}, e.g. "
                        f"{', '.join(missing[:3])}; put them there")
    checksum = file_sha256(csv_path)
    key = cache_key(csv=checksum, images=listing_fingerprint(images_dir, files), size=image_size, transform=TRANSFORM)

    def build():
        return {"images": decode_many([(str(p), lambda p=p: p) for p in files], (image_size, image_size), "RGB")}

    images = cached(cache_dir, f"mini_imagenet-{split}-{image_size}", key, build)["images"]
    class_names = sorted(labels)
    class_of = {c: i for i, c in enumerate(class_names)}
    info = dict(dataset="mini_imagenet", split=split, sources={f"{split}.csv": checksum}, image_size=image_size,
                transform=TRANSFORM)
    return ClassImages.from_labels(images, [class_of[lab] for _, lab in rows], class_names, info)
