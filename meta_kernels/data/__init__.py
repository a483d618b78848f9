"""Episodes and datasets: deterministic N-way K-shot episodes from images held in memory.

    data = load_dataset("omniglot", root, "train", variant="small")
    sampler = EpisodeSampler(data, EpisodeConfig(n_way=5, k_shot=1, q_query=15), seed=0)
    for batch in sampler.epoch(epoch, meta_batch_size=32, rank=rank, world_size=world):
        ...  # batch.x_support [T, N*K, C, H, W], batch.y_support [T, N*K], batch.x_query, batch.y_query
"""
from .base import SPLITS, ClassImages, DataError, assign_splits
from .cache import default_cache_dir
from .episodes import (EpisodeDataset, EpisodeSampler, Prefetcher, RandomCropFlip, TaskBatch, collate_tasks,
                       episode_rng, shard_bounds)
from .factory import LOADERS, load_dataset
from .folder import load_folder
from .mini_imagenet import load_mini_imagenet
from .omniglot import download_omniglot, load_omniglot, verify_archive

__all__ = ["SPLITS", "ClassImages", "DataError", "assign_splits", "default_cache_dir", "EpisodeDataset",
           "EpisodeSampler", "Prefetcher", "RandomCropFlip", "TaskBatch", "collate_tasks", "episode_rng",
           "shard_bounds", "LOADERS", "load_dataset", "load_folder", "load_mini_imagenet", "download_omniglot",
           "load_omniglot", "verify_archive"]
