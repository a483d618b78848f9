"""The in-memory form every dataset loads into, the class-split rule, and image decoding.

Every loader (Omniglot, mini-ImageNet, folder) ends in a `ClassImages`: one uint8 tensor of
all images of one split, grouped by class, so that an episode is an index gather and never an
image decode.
"""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

SPLITS = ("train", "val", "test")
SAME_SHAPE_HELP = ("set data.image_size (and data.channels: 1 or 3) in the config, e.g. --set data.image_size=28, "
                   "or pass image_size=... to resize all images to one size")


class DataError(ValueError):
    """Bad data or a bad data request; the message says what was wrong and what to do."""


@dataclass(frozen=True, eq=False)
class ClassImages:
    """Images of one split grouped by class: class c is `images[offsets[c]:offsets[c + 1]]`.

    images: uint8 [M, C, H, W]; offsets: int64 [n_classes + 1]; class_names: one per class;
    info: provenance (dataset, split, source checksums, transform) for logs and checkpoints.
    """
    images: torch.Tensor
    offsets: torch.Tensor
    class_names: tuple[str, ...]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be a uint8 [M, C, H, W] tensor, got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if len(self.class_names) + 1 != len(self.offsets) or int(self.offsets[-1]) != len(self.images):
            raise DataError("offsets must have n_classes + 1 entries ending at the image count")

    @classmethod
    def from_labels(cls, images: torch.Tensor, labels: torch.Tensor | np.ndarray,
                    class_names: Sequence[str], info: dict | None = None) -> "ClassImages":
        """Group `images` by integer `labels` (indices into `class_names`); the order within a
        class is kept (stable sort), so the result does not depend on the sort algorithm."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        order = torch.sort(labels, stable=True).indices
        counts = torch.bincount(labels, minlength=len(class_names))
        offsets = torch.zeros(len(class_names) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        if not torch.equal(order, torch.arange(len(order))):  # sorted input (the usual case) is not copied
            images = images[order]
        return cls(images.contiguous(), offsets, tuple(class_names), dict(info or {}))

    @classmethod
    def from_dataset(cls, dataset, *, image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                     info: dict | None = None) -> "ClassImages":
        """Any map-style dataset of (image, label) pairs (len(ds) and ds[i], e.g. torchvision's
        Omniglot or ImageFolder) as ClassImages: images are PIL images, numpy arrays [H, W] or
        [H, W, C], or tensors [H, W] or [C, H, W], uint8 or float in [0, 1]; labels are integers.
        Classes are the labels present, in increasing order, named from `dataset.classes` when it
        has them. image_size / channels (1 or 3) resize and convert as the folder loader does."""
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        arrays, labels = [], []
        for i in range(len(dataset)):
            image, label = dataset[i]
            arrays.append(_as_chw_uint8(image, size, channels, f"item {i} of {type(dataset).__name__}"))
            labels.append(_as_label(label, i))
        if not arrays:
            raise DataError(f"{type(dataset).__name__} is empty")
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            first = next(i for i, a in enumerate(arrays) if a.shape != arrays[0].shape)
            raise DataError(f"item {first} of {type(dataset).__name__} has shape {arrays[first].shape} (C, H, W) but "
                            f"item 0 has {arrays[0].shape}; pass image_size=... (and channels=...) to from_dataset")
        present = sorted(set(labels))
        names = getattr(dataset, "classes", None)
        named = isinstance(names, Sequence) and len(names) > present[-1] and present[0] >= 0
        class_of = {lab: c for c, lab in enumerate(present)}
        info = {"dataset": type(dataset).__name__, "image_size": size, "channels": channels, **(info or {})}
        return cls.from_labels(torch.from_numpy(np.stack(arrays)), [class_of[lab] for lab in labels],
                               [str(names[lab]) if named else str(lab) for lab in present], info)

    def with_channels(self, channels: int) -> "ClassImages":
        """Grayscale as RGB (the channel repeated) or RGB as grayscale (Pillow's 'L' weights);
        itself when it has them already."""
        have = self.images.shape[1]
        if have == channels:
            return self
        if (have, channels) == (1, 3):
            images = self.images.expand(-1, 3, -1, -1).contiguous()
        elif (have, channels) == (3, 1):
            weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
            images = ((self.images.int() * weights).sum(1, keepdim=True) / 1000).round().to(torch.uint8)
        else:
            raise DataError(f"cannot convert {have}-channel images to {channels} channels; choose 1 or 3")
        return ClassImages(images, self.offsets, self.class_names, {**self.info, "channels": channels})

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def labels(self) -> torch.Tensor:
        """Class index of every image, int64 [M]."""
        return torch.repeat_interleave(torch.arange(self.n_classes), self.counts)

    def select(self, classes: Sequence[int], info: dict | None = None) -> "ClassImages":
        """The sub-dataset of the given classes, in the given order."""
        classes = torch.as_tensor(list(classes), dtype=torch.int64)
        starts, counts = self.offsets[classes], self.counts[classes]
        # Index of every image of the chosen classes, class by class, without a Python loop.
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        index = torch.repeat_interleave(starts, counts) + within
        offsets = torch.zeros(len(classes) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        return ClassImages(self.images[index], offsets, tuple(self.class_names[c] for c in classes.tolist()),
                           {**self.info, **(info or {})})

    def with_rotations(self, angles: Sequence[int] = (0, 90, 180, 270)) -> "ClassImages":
        """Each rotation of each class becomes a new class (Omniglot practice); class c rotated by
        angles[r] is class c * len(angles) + r, named '<name>/rot<angle>'."""
        if any(a % 90 for a in angles):
            raise DataError(f"rotations must be multiples of 90 degrees, got {list(angles)}")
        rotated = torch.stack([torch.rot90(self.images, a // 90, dims=(2, 3)) for a in angles], 1)
        labels = (self.labels()[:, None] * len(angles) + torch.arange(len(angles))).flatten()
        names = [f"{n}/rot{a}" for n in self.class_names for a in angles]
        return ClassImages.from_labels(rotated.flatten(0, 1), labels, names,
                                       {**self.info, "rotations": list(angles)})


def _as_label(label, i: int) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise DataError(f"item {i}: the label must be an integer class index, got {label!r}")
    return int(label)


def _as_chw_uint8(image, size: tuple[int, int] | None, channels: int | None, what: str) -> np.ndarray:
    """One image of a user's dataset as uint8 [C, H, W]; resized / converted through Pillow
    (as decode_image does) only when asked."""
    from PIL import Image
    if isinstance(image, Image.Image):
        image = image.convert("L" if image.mode in ("1", "L", "I", "F", "I;16") else "RGB")
        arr = np.asarray(image)
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if isinstance(image, torch.Tensor) and arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)  # tensors are [C, H, W], numpy images [H, W, C]
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or arr.ndim == 3 and arr.shape[2] not in (3, 4):
            raise DataError(f"{what}: expected an image [H, W], [H, W, C] (numpy) or [C, H, W] (tensor) with 1, 3 "
                            f"or 4 channels, got shape {tuple(image.shape)}")
        if arr.dtype.kind == "f":  # torchvision's ToTensor gives floats in [0, 1]
            arr = np.clip(np.rint(arr * 255), 0, 255)
        elif arr.dtype == np.bool_:
            arr = arr * 255
        elif arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{what}: integer pixel values must be in [0, 255], got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]  # alpha is not part of the image
    else:
        raise DataError(f"{what}: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if size is not None and arr.shape[:2] != tuple(size) or channels is not None and (arr.ndim == 2) != (channels == 1):
        im = Image.fromarray(arr).convert({1: "L", 3: "RGB"}.get(channels, "L" if arr.ndim == 2 else "RGB"))
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        arr = np.array(im, dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def assign_splits(units: Sequence[str], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
    """Split units (classes, characters or alphabets: whatever must not straddle splits) into
    train / val / test by a seeded permutation of their sorted names, so the split depends on
    nothing but the names, the fractions and the seed. A positive fraction gets >= 1 unit."""
    units = sorted(set(units))
    n = len(units)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {f}")
    n_val, n_test = (max(1, round(f * n)) if f > 0 else 0 for f in (val_fraction, test_fraction))
    if n - n_val - n_test < 1:
        raise DataError(f"cannot split {n} units into train/val/test with val_fraction={val_fraction}, "
                        f"test_fraction={test_fraction}: the train split would be empty; lower the fractions")
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, i in enumerate(order.tolist()):
        out[units[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def resolve_root(name: str, root: str | os.PathLike | None) -> Path:
    """The dataset folder: `root` if given, else $META_KERNELS_DATA/<name>."""
    if root is not None:
        return Path(root).expanduser()
    base = os.environ.get("META_KERNELS_DATA")
    if not base:
        raise DataError(f"no folder given for dataset {name!r}: pass root=... or set META_KERNELS_DATA "
                        f"to a folder that holds {name}/")
    return Path(base).expanduser() / name


def decode_image(data: bytes | Path, size: tuple[int, int] | None, mode: str, what: str) -> np.ndarray:
    """Decode one image file to uint8 [C, H, W], resized to `size` (H, W) with Lanczos (the
    antialiasing filter, right for the large down-scaling of Omniglot's 105 px to 28 px)."""
    from PIL import Image, UnidentifiedImageError  # Pillow is needed only when decoding
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            arr = np.array(im, dtype=np.uint8)  # a writable copy, which torch.from_numpy wants
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{what} is not a readable image ({type(e).__name__}: {e}); remove or replace it") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_many(items: Sequence[tuple[str, Callable[[], bytes | Path]]], size: tuple[int, int] | None,
                mode: str) -> torch.Tensor:
    """Decode (description, read) pairs into one preallocated uint8 [M, C, H, W] tensor. With
    size=None every image must already have the first image's size."""
    out = None
    for i, (what, read) in enumerate(items):
        try:
            data = read()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise DataError(f"could not read {what} ({type(e).__name__}: {e}); the file is damaged: replace it") from e
        arr = decode_image(data, size, mode, what)
        if out is None:
            out = torch.empty((len(items), *arr.shape), dtype=torch.uint8)
        elif tuple(arr.shape) != tuple(out.shape[1:]):
            raise DataError(f"{what} has shape {tuple(arr.shape)} (C, H, W) but {items[0][0]} has "
                            f"{tuple(out.shape[1:])}; {SAME_SHAPE_HELP}")
        out[i] = torch.from_numpy(arr)
    if out is None:
        raise DataError("no images to decode")
    return out
