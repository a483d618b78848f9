"""Deterministic N-way K-shot episodes, assembled by index gather into task batches.

An episode is a pure function of (seed, epoch, episode_idx): its random numbers come from a
generator seeded by hashing that triple (numpy's SeedSequence), never from global RNG state, so
the same episode comes out in any process, DataLoader worker, rank or resumed run, whatever
else has drawn random numbers before.
"""
from __future__ import annotations

import inspect
import queue
import threading
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from meta_kernels.config import EpisodeConfig

from .base import ClassImages, DataError

# Separate random streams per episode: turning augmentation on must not change which images
# an episode holds.
SAMPLE_STREAM, AUGMENT_STREAM = 0, 1


def episode_rng(seed: int, epoch: int, episode_idx: int, stream: int = SAMPLE_STREAM) -> np.random.Generator:
    """The generator of one episode: PCG64 seeded by SeedSequence's hash of the key. Each part
    must fit 32 bits: SeedSequence splits larger integers into words, which could make two
    different keys hash alike."""
    key = (seed, epoch, episode_idx)
    if not all(0 <= v < 2**32 for v in key):
        raise DataError(f"seed, epoch and episode index must be in [0, 2**32), got {key}")
    return np.random.default_rng([seed, epoch, episode_idx, stream])


def choose_without_replacement(u: np.ndarray, n: int) -> np.ndarray:
    """Row-wise uniform draw without replacement of u.shape[1] values from range(n), in draw
    order, from uniforms u [T, m] in [0, 1): draw j picks rank floor(u_j * (n - j)) among the
    values not drawn yet. Vectorised over rows; O(m^2) tiny array ops, independent of n."""
    T, m = u.shape
    out = np.empty((T, m), dtype=np.int64)
    for j in range(m):
        c = (u[:, j] * (n - j)).astype(np.int64)
        # rank -> value: step over the already drawn values, smallest first.
        for s in np.sort(out[:, :j], axis=1).T:
            c += c >= s
        out[:, j] = c
    return out


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's share of n items: contiguous, sizes differ by at most one, the
    shares of ranks 0..world_size-1 tile [0, n) with no overlap and no gap."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if n < world_size:
        raise DataError(f"a meta-batch of {n} tasks cannot be shared by {world_size} ranks: every rank needs "
                        f">= 1 task; raise the meta-batch size to >= {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass
class TaskBatch:
    """T tasks: float32 images in [0, 1] x_support [T, N*K, C, H, W], x_query [T, N*Q, C, H, W];
    int64 labels y_support [T, N*K], y_query [T, N*Q] in 0..N-1, class-major (label j's rows are
    contiguous); classes [T, N]: the dataset class behind label j, for logs and checks."""
    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    classes: torch.Tensor

    @property
    def n_tasks(self) -> int:
        return self.x_support.shape[0]

    @property
    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_support, self.y_support

    @property
    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_query, self.y_query

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TaskBatch":
        return TaskBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "TaskBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TaskBatch":
        """Page-locked copy, so that .to(cuda, non_blocking=True) overlaps with compute."""
        return self._map(torch.Tensor.pin_memory)


def collate_tasks(batches: Sequence[TaskBatch]) -> TaskBatch:
    """Concatenate task batches along the task dimension (a DataLoader collate_fn)."""
    return TaskBatch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(TaskBatch)})


class RandomCropFlip:
    """Pad-and-random-crop plus horizontal flip, per image, drawn from the episode's augmentation
    generator: [T, n, C, H, W] uint8 in, same out; one vectorised gather for the whole batch."""

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise DataError(f"padding must be >= 0, got {padding}")
        self.padding, self.flip = padding, flip

    takes_rngs = True  # called as augment(x, rngs) on a whole batch

    def __repr__(self) -> str:  # recorded in EpisodeSampler.state_dict
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, rngs: Sequence[np.random.Generator]) -> torch.Tensor:
        T, n, C, H, W = x.shape
        p = self.padding
        draws = torch.from_numpy(np.stack([r.integers(0, [2 * p + 1, 2 * p + 1, 1 + self.flip], size=(n, 3))
                                           for r in rngs])).reshape(T * n, 3)
        dy, dx, flip = draws.unbind(1)
        rows = dy[:, None] + torch.arange(H)
        cols = torch.where(flip[:, None].bool(), dx[:, None] + torch.arange(W - 1, -1, -1), dx[:, None] + torch.arange(W))
        padded = F.pad(x.reshape(T * n, C, H, W), (p, p, p, p))
        out = padded[torch.arange(T * n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [Tn, H, W, C]
        return out.permute(0, 3, 1, 2).reshape(T, n, C, H, W)


# Either a batch augmentation (uint8 [T, n, C, H, W], one generator per episode) -> the same,
# like RandomCropFlip, or any one-argument callable on one image, f(uint8 [C, H, W]) -> [C, H, W]
# (uint8, or float already scaled), such as a torchvision v2 transform.
Augment = Callable[[torch.Tensor, Sequence[np.random.Generator]], torch.Tensor] | Callable[[torch.Tensor], torch.Tensor]


def takes_rngs(augment: Callable) -> bool:
    """Whether `augment` is a batch augmentation called as augment(x, rngs): it says so with a
    `takes_rngs` attribute, else by two required positional parameters. A callable taking
    *args (torchvision transforms, nn.Modules) is a one-image transform."""
    flag = getattr(augment, "takes_rngs", None)
    if flag is not None:
        return bool(flag)
    try:
        params = inspect.signature(augment).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature take one image
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def transform_images(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     rng: np.random.Generator) -> torch.Tensor:
    """`transform` applied to each image of x [n, C, H, W] with torch's random numbers drawn
    from a generator seeded by the episode's augmentation stream (and the global state left
    as it was), so that a random transform gives the same episode in any process or resume."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**63)))
        out = [transform(image) for image in x]
    bad = next((o for o in out if not isinstance(o, torch.Tensor) or o.dim() != 3), None)
    if bad is not None:
        raise DataError(f"a transform must return an image tensor [C, H, W], got "
                        f"{tuple(bad.shape) if isinstance(bad, torch.Tensor) else type(bad).__name__}")
    if len({(o.shape, o.dtype) for o in out}) > 1:
        raise DataError(f"a transform must return images of one shape and dtype, got "
                        f"{sorted({(tuple(o.shape), str(o.dtype)) for o in out})}")
    return torch.stack(out)


class EpisodeSampler:
    """N-way K-shot Q-query episodes of one split (a ClassImages), numbered per epoch.

    Episode (epoch, i) draws N distinct classes (their draw order is the label order, so labels
    are a fresh 0..N-1 mapping per episode) and K + Q distinct images of each class. Meta-batch
    `step` of an epoch holds episodes [step * B, (step + 1) * B); rank r of W gets its
    `shard_bounds` share of them.
    """

    def __init__(self, dataset: ClassImages, config: EpisodeConfig, seed: int = 0, augment: Augment | None = None):
        """augment: applied to every episode's support and query images, after the decode cache
        (a RandomCropFlip, or any transform of one image tensor, see `Augment`)."""
        n, k, q = config.n_way, config.k_shot, config.q_query
        split = dataset.info.get("split", "?")
        if n > dataset.n_classes:
            raise DataError(f"n_way={n} is larger than the {dataset.n_classes} classes of the "
                            f"{dataset.info.get('dataset', 'dataset')} {split} split; lower n_way or use a split "
                            f"with more classes")
        short = (dataset.counts < k + q).nonzero().flatten().tolist()
        if short:
            listed = ", ".join(f"{dataset.class_names[c]!r} ({int(dataset.counts[c])})" for c in short[:5])
            raise DataError(f"{len(short)} class(es) of the {split} split have fewer than k_shot + q_query = "
                            f"{k + q} images: {listed}{', ...' if len(short) > 5 else ''}; lower k_shot/q_query "
                            f"or remove those classes")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.dataset, self.config, self.seed, self.augment = dataset, config, seed, augment
        self._batch_augment = augment is not None and takes_rngs(augment)
        self._counts = dataset.counts.numpy()
        self._starts = dataset.offsets[:-1].numpy()
        self._max_count = int(self._counts.max())
        self._uniform = bool((self._counts == self._max_count).all())
        # Labels are the same for every episode: class-major 0..N-1.
        self._y_support = torch.arange(n).repeat_interleave(k)
        self._y_query = torch.arange(n).repeat_interleave(q)

    def __len__(self) -> int:
        return self.config.episodes_per_epoch

    def steps_per_epoch(self, meta_batch_size: int) -> int:
        """Whole meta-batches per epoch; a remainder of episodes_per_epoch is not used."""
        if not 1 <= meta_batch_size <= len(self):
            raise DataError(f"meta_batch_size must be in [1, episodes_per_epoch={len(self)}], got {meta_batch_size}")
        return len(self) // meta_batch_size

    def indices(self, epoch: int, episode_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """classes [T, N], support image indices [T, N, K], query image indices [T, N, Q] of the
        episodes `episode_ids` of `epoch`. Each episode's numbers come from its own generator and
        every later step works row by row, so an episode is the same in any batch."""
        n, k, q = self.config.n_way, self.config.k_shot, self.config.q_query
        m, width = k + q, self._max_count
        # One draw per episode: N uniforms for the classes, one per image slot for the picks.
        u = np.stack([episode_rng(self.seed, epoch, i).random(n + n * width) for i in episode_ids])
        classes = choose_without_replacement(u[:, :n], self.dataset.n_classes)
        # K + Q distinct images per class: the slots with the K + Q smallest uniforms, in
        # increasing order; slots past a smaller class's count get 2.0 so they are never picked.
        r = u[:, n:].reshape(len(u), n, width)
        if not self._uniform:
            r[np.arange(width) >= self._counts[classes][..., None]] = 2.0
        pick = np.argpartition(r, m - 1, axis=2)[..., :m] if m < width else np.argsort(r, axis=2)
        pick = np.take_along_axis(pick, np.argsort(np.take_along_axis(r, pick, 2), 2), 2)
        image = self._starts[classes][..., None] + pick
        return classes, image[..., :k], image[..., k:]

    def episodes(self, epoch: int, episode_ids: Iterable[int]) -> TaskBatch:
        """The given episodes of `epoch` as one TaskBatch (T = number of ids)."""
        episode_ids = list(episode_ids)
        if not episode_ids:
            raise DataError("a task batch needs at least one episode")
        classes, support, query = self.indices(epoch, episode_ids)
        T, (n, k, q) = len(episode_ids), (self.config.n_way, self.config.k_shot, self.config.q_query)
        index = torch.from_numpy(np.concatenate([support.ravel(), query.ravel()]))
        x = self.dataset.images.index_select(0, index)
        x_s, x_q = x[: T * n * k].unflatten(0, (T, n * k)), x[T * n * k:].unflatten(0, (T, n * q))
        if self.augment is not None:
            rngs = [episode_rng(self.seed, epoch, i, AUGMENT_STREAM) for i in episode_ids]
            if self._batch_augment:
                x_s, x_q = self.augment(x_s, rngs), self.augment(x_q, rngs)
            else:  # one image at a time; an episode's support and query share its generator
                both = [transform_images(self.augment, torch.cat([s, q]), r) for s, q, r in zip(x_s, x_q, rngs)]
                x_s, x_q = torch.stack([b[: n * k] for b in both]), torch.stack([b[n * k:] for b in both])
        # Convert then scale in place: measured faster than a mixed-dtype mul on this CPU. A
        # transform that returns floats has scaled them itself.
        scale = lambda t: t.float().mul_(1.0 / 255) if t.dtype == torch.uint8 else t.float()
        return TaskBatch(scale(x_s), self._y_support.expand(T, -1).contiguous(),
                         scale(x_q), self._y_query.expand(T, -1).contiguous(),
                         torch.from_numpy(classes))

    def episode(self, epoch: int, episode_idx: int) -> TaskBatch:
        return self.episodes(epoch, [episode_idx])

    def meta_batch(self, epoch: int, step: int, meta_batch_size: int, rank: int = 0,
                   world_size: int = 1) -> TaskBatch:
        """This rank's share of meta-batch `step` of `epoch`. When world_size does not divide
        meta_batch_size the shares differ by one task: average the loss over all tasks (sum per
        rank / meta_batch_size), not per rank, to get the unsharded meta-gradient."""
        steps = self.steps_per_epoch(meta_batch_size)
        if not 0 <= step < steps:
            raise DataError(f"step must be in [0, {steps}) for meta_batch_size={meta_batch_size} and "
                            f"episodes_per_epoch={len(self)}, got {step}")
        start, stop = shard_bounds(meta_batch_size, rank, world_size)
        first = step * meta_batch_size
        return self.episodes(epoch, range(first + start, first + stop))

    def epoch(self, epoch: int, meta_batch_size: int, rank: int = 0, world_size: int = 1, *,
              start_step: int = 0, prefetch: int = 0, pin_memory: bool = False) -> Iterator[TaskBatch]:
        """The meta-batches of one epoch from `start_step` (resume); prefetch > 0 assembles that
        many batches ahead in a background thread (a Prefetcher: close it, or use it in a `with`
        block, when leaving the epoch early)."""
        batches = (self.meta_batch(epoch, s, meta_batch_size, rank, world_size)
                   for s in range(start_step, self.steps_per_epoch(meta_batch_size)))
        if prefetch > 0:
            return Prefetcher(batches, depth=prefetch, pin_memory=pin_memory)
        return (b.pin_memory() for b in batches) if pin_memory else batches

    def state_dict(self) -> dict:
        """What fixes the episodes, for checkpoints: with it and (epoch, step) a run resumes on
        exactly the episodes it would have seen."""
        return {"seed": self.seed, "n_way": self.config.n_way, "k_shot": self.config.k_shot,
                "q_query": self.config.q_query, "episodes_per_epoch": self.config.episodes_per_epoch,
                "dataset": self.config.dataset, "augment": repr(self.augment) if self.augment else None,
                "data": dict(self.dataset.info), "n_classes": self.dataset.n_classes}


class EpisodeDataset(torch.utils.data.Dataset):
    """Episode i of one epoch as a T = 1 TaskBatch, for torch DataLoader (use
    collate_fn=collate_tasks). Workers give the same episodes as the main process."""

    def __init__(self, sampler: EpisodeSampler, epoch: int = 0):
        self.sampler, self.epoch = sampler, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> TaskBatch:
        return self.sampler.episode(self.epoch, i)


_END = object()


class Prefetcher:
    """Iterates `iterable` in a background thread, up to `depth` items ahead (the gather and
    float conversion release the GIL, so assembly overlaps with the training step). Errors are
    re-raised in the consumer; close() (or leaving a `with` block) stops the thread."""

    def __init__(self, iterable: Iterable, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise DataError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable), pin_memory), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator, pin_memory: bool) -> None:
        try:
            for item in it:
                if not self._put(item.pin_memory() if pin_memory else item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __del__(self) -> None:  # an abandoned prefetcher must not keep its thread polling forever
        self._stop.set()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
