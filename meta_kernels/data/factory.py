"""load_dataset: one entry point from a dataset name (EpisodeConfig.dataset) to ClassImages."""
from __future__ import annotations

import os

from .base import ClassImages, DataError
from .folder import load_folder
from .mini_imagenet import load_mini_imagenet
from .omniglot import load_omniglot

LOADERS = {"omniglot": load_omniglot, "mini_imagenet": load_mini_imagenet, "custom": load_folder}


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", **options) -> ClassImages:
    """One split of the named image dataset; options go to its loader (load_omniglot,
    load_mini_imagenet, load_folder). root None: $META_KERNELS_DATA/<name>."""
    if name not in LOADERS:
        hint = " (sinusoid is a regression task generated in code, not an image dataset)" if name == "sinusoid" else ""
        raise DataError(f"unknown dataset {name!r}{hint}; choose one of {', '.join(LOADERS)}")
    return LOADERS[name](root, split, **options)
