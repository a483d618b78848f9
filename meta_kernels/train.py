"""The meta-training runner: episodes -> MetaLearner steps, validation, checkpoints with exact
resume, metrics (JSON lines + a final JSON) and plots."""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from meta_kernels import distributed
from meta_kernels.checkpoint import (SHARDED_SUFFIX, CheckpointError, config_differences, is_sharded_checkpoint,
                                     load_any_checkpoint, load_checkpoint, load_latest_intact, load_sharded,
                                     remove_checkpoint, remove_orphan_temp_files, rng_state, save_checkpoint,
                                     save_sharded, set_rng_state, step_checkpoints)
from meta_kernels.config import MetaLearningFullConfig
from meta_kernels.loggers import Logger, build_loggers, strict_json
from meta_kernels.malloc_tuning import keep_freed_cpu_memory
from meta_kernels.data import EpisodeSampler, load_dataset
from meta_kernels.meta import InnerLoopSettings, Learner, MetaLearner, ShardedMetaLearner
from meta_kernels.models import Conv4, ViT

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # offsets of each split's episode stream
# Signals that stop a single-process run cleanly (save the current step, then exit 128 + signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEFAULT_PREEMPT_SIGNAL = signal.SIGUSR1  # what SLURM sends before preempting a job
RUN_FILES = ("metrics.jsonl", "metrics.json", "training_curves.png", "config.yaml")


class TrainingInterrupted(Exception):
    """fit() stopped on a signal after saving its current step; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {path}; continue with --resume")


@contextlib.contextmanager
def run_folder_lock(folder: Path):
    """An exclusive lock on a run folder while a run writes to it; a second run is refused."""
    f = (folder / ".lock").open("a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CheckpointError(f"{folder} is in use by another run ({holder}); wait for it to finish or choose "
                                  "another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output folder {path} is not writable ({exc.strerror}); choose another with --out") from exc
    return path


def load_split(config: MetaLearningFullConfig, split: str):
    ep, run = config.episodes, config.run
    options = {}
    if ep.dataset == "omniglot":
        options = {"variant": run.omniglot_variant}
        if run.omniglot_variant == "small":
            options["split_by"] = "character"  # 8 alphabets are too few to split by alphabet
        if run.omniglot_split != "default":  # passed only when set: older configs load as before
            options["scheme"] = run.omniglot_split
    data = config.data
    if data.image_size is not None:
        options["image_size"] = data.image_size
    if ep.dataset == "custom":
        options["class_depth"] = data.class_depth
        if data.channels is not None:
            options["mode"] = "L" if data.channels == 1 else "RGB"
    dataset = load_dataset(ep.dataset, run.data_root, split, **options)
    # Other datasets decode to their own channels (Omniglot 1, mini-ImageNet 3): converted here.
    return dataset.with_channels(data.channels) if data.channels is not None else dataset


def build_model(config: MetaLearningFullConfig, image_shape) -> torch.nn.Module:
    c, h, _ = image_shape
    m = config.model
    if m.factory is not None:
        return user_model(m.factory, config.episodes.n_way, tuple(image_shape))
    if m.arch == "vit":
        # Second-order MAML differentiates the attention twice, which the fused kernels cannot.
        return ViT(in_channels=c, image_size=h, n_way=config.episodes.n_way, dim=m.dim, depth=m.depth, heads=m.heads,
                   patch_size=m.patch_size, mlp_ratio=m.mlp_ratio,
                   attention="math" if config.maml.second_order else "sdpa")
    bn_steps = config.maml.inner_steps + 1 if config.mamlpp.bn_mode == "per_step" else 1
    return Conv4(in_channels=c, n_way=config.episodes.n_way, filters=m.filters, image_size=h, bn_steps=bn_steps)


def user_model(factory: str, n_way: int, image_shape: tuple[int, ...]) -> torch.nn.Module:
    """The model of `factory` ('package.module:function'), called as function(n_way, image_shape)."""
    import importlib
    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model.factory {factory!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model.factory {factory!r}: {module_name} has no function {attr!r}")
    try:
        model = fn(n_way, image_shape)
    except Exception as exc:  # the user's code: say whose, with its traceback
        trace = "".join(traceback.format_exception(exc)[-6:]).rstrip()
        raise ValueError(f"model.factory {factory!r} raised {type(exc).__name__} when called as "
                         f"{attr}({n_way}, {tuple(image_shape)}):\n{trace}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model.factory {factory!r} returned {type(model).__name__}, not an nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model.factory {factory!r} built a model with no trainable parameters ({type(model).__name__} "
                         f"holds {sum(1 for _ in model.parameters())} parameter(s), none requiring grad): meta-training "
                         "would change nothing; return a model with trainable layers")
    _check_output_width(model, factory, n_way, image_shape)
    return model


def _check_output_width(model: torch.nn.Module, factory: str, n_way: int, image_shape) -> None:
    """The factory's model must give n_way scores per sample: one forward of two blank images in
    eval mode (running statistics untouched)."""
    from meta_kernels.meta.inner_common import prediction
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = prediction(model(torch.zeros(2, *image_shape, device=next(model.parameters()).device)))
    except Exception as exc:  # noqa: BLE001 - the same error comes with its context at the first step
        warnings.warn(f"model.factory {factory!r}: a forward of two blank {tuple(image_shape)} images failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", stacklevel=3)
        return
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    if out.dim() < 2 or out.shape[-1] != n_way:
        raise ValueError(f"model.factory {factory!r} builds a model that gives {list(out.shape[1:])} outputs per sample, "
                         f"but episodes.n_way is {n_way}: its last layer must give n_way class scores (it is called "
                         "as factory(n_way, image_shape))")


def build_learner(model: torch.nn.Module, config: MetaLearningFullConfig) -> Learner:
    """FSDP: all ranks adapt every task together on the parameter shards (meta_kernels.meta.sharded);
    the ranks built identical weights from the same seed before sharding. Otherwise every rank
    holds the whole model, starting from rank 0's weights, and adapts its share of the meta-batch."""
    if config.run.sharding == "fsdp":
        return ShardedMetaLearner(model, config.maml, autocast=config.run.autocast)
    distributed.broadcast_(list(model.parameters()) + list(model.buffers()))
    return MetaLearner(model, config.maml, mamlpp=config.mamlpp)


def evaluation_batches(sampler: EpisodeSampler, episodes: int, batch_size: int, device):
    """Episodes 0..episodes-1 of epoch 0 (the same ones at every evaluation), batch_size at a time."""
    for start in range(0, episodes, batch_size):
        yield sampler.episodes(0, range(start, min(episodes, start + batch_size))).to(device)


class Trainer:
    def __init__(self, config: MetaLearningFullConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, preempt_signal: int | None = DEFAULT_PREEMPT_SIGNAL,
                 loggers: list[Logger] = ()):
        """resume: continue the run in out_dir from its newest intact checkpoint; overwrite: replace
        the run in out_dir (a fresh run into a folder holding one is refused otherwise).
        preempt_signal: besides SIGTERM and SIGINT, the signal that saves and stops a
        single-process run (SIGUSR1 by default; None for none). loggers: your own
        meta_kernels.loggers.Logger objects, besides those of run.loggers; call close() at the end."""
        if str(config.run.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"run.device={config.run.device!r}, but this torch has no CUDA device (torch "
                             f"{torch.__version__}, CUDA {'built' if torch.version.cuda else 'not built'}); set "
                             "run.device=cpu or run on a machine with a GPU")
        # Under torchrun: join the process group; rank 0 alone writes metrics, plots, checkpoints.
        self.rank, self.world_size = distributed.init_from_env(config.run.device, config.run.dist_timeout_s)
        # Built on every rank, so a missing package fails on all of them; rank 0 alone logs.
        built = [*build_loggers(config.run.loggers), *loggers]
        self.loggers = built if self.rank == 0 else []
        self.config, self.progress = config, progress and self.rank == 0
        self.preempt_signal = preempt_signal
        self.out = _writable_dir(Path(out_dir)) if self.rank == 0 else Path(out_dir)
        if self.rank == 0:
            with run_folder_lock(self.out):  # refused here already when another run holds the folder
                self._prepare_folder(resume, overwrite)
        if config.run.num_threads:
            torch.set_num_threads(config.run.num_threads)
        if config.run.keep_freed_cpu_memory and config.run.device == "cpu":
            keep_freed_cpu_memory()
        torch.manual_seed(config.run.seed)
        self.data = {s: load_split(config, s) for s in ("train", "val")}
        self.samplers = {s: EpisodeSampler(d, config.episodes, seed=config.run.seed + SPLIT_SEEDS[s])
                         for s, d in self.data.items()}
        self.model = build_model(config, self.data["train"].image_shape).to(config.run.device)
        self.learner = build_learner(self.model, config)
        total = config.run.epochs * self.samplers["train"].steps_per_epoch(config.maml.meta_batch_size)
        self.trained_seconds, self._fit_start = 0.0, None  # over every fit of this run (kept by checkpoints)
        self.scheduler = None
        if config.mamlpp.cosine_meta_lr and config.mamlpp.cosine_over == "budget":
            budget = 60.0 * config.run.max_minutes
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.learner.optimizer, lambda _: 0.5 * (1 + math.cos(math.pi * min(1.0, self._clock() / budget))))
        elif config.mamlpp.cosine_meta_lr:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.learner.optimizer, T_max=max(total, 1))
        self.epoch, self.step, self.global_step, self.best_val = 0, 0, 0, -math.inf
        self.history: list[dict] = []
        if resume:
            self._resume()
        for logger in self.loggers:  # after a resume: the loggers continue from the checkpoint's history
            logger.start(self.out, config.to_dict(), self.history)

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise CheckpointError("resume and overwrite exclude each other (continue the run in the folder, or replace "
                                  "it?); pass one of --resume / --overwrite")
        saved = [p for p in [*self.ckpt_dir.glob("*.pt"), *self.ckpt_dir.glob(f"*{SHARDED_SUFFIX}")] if p.exists()]
        if saved and not resume and not overwrite:
            raise CheckpointError(f"{self.out} holds a run ({', '.join(p.name for p in saved[:4])}); pass --resume to "
                                  "continue it or --overwrite to replace it, or choose another --out")
        if not saved and not resume and (self.out / "metrics.jsonl").exists():
            warnings.warn(f"{self.out} holds the files of a run that saved no checkpoint (stopped before its first "
                          "save): nothing to resume, so this run starts afresh and replaces them", stacklevel=3)
            overwrite = True
        if overwrite and not resume:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        if self.ckpt_dir.is_dir():
            remove_orphan_temp_files(self.ckpt_dir)

    def data_fingerprint(self) -> dict:
        """Provenance of the training and validation data (sources, checksums, transform)."""
        return {split: strict_json(dict(d.info)) for split, d in self.data.items()}

    @property
    def sharded_checkpoints(self) -> bool:
        """FSDP runs save folders of shards through torch.distributed.checkpoint (checkpoint.py)."""
        return hasattr(self.learner, "sharded_state_dict")

    def checkpoint_path(self, name: str) -> Path:
        """Where checkpoint `name` ("best.pt", "step-N.pt") lives: a step-N.dcp folder for a sharded run."""
        path = self.ckpt_dir / name
        return path.with_suffix(SHARDED_SUFFIX) if self.sharded_checkpoints else path

    def _payload(self, sharded: bool = False) -> dict:
        """Everything a checkpoint holds; `sharded`: all but the weights and optimiser state,
        which DCP writes as shards."""
        cfg = self.config.checkpoint
        # The history's records are strict JSON already (made so when appended): saved as they are.
        payload = {"learner": {"outer_steps": self.learner.outer_steps} if sharded else self.learner.state_dict(),
                   "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                   "config": self.config.to_dict(), "algo": self.config.maml.algo,
                   "inner_steps": self.config.maml.inner_steps,
                   "counters": {"epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                                "best_val": self.best_val},
                   "history": self.history, "data": self.data_fingerprint(), "trained_seconds": self._seconds()}
        if not sharded:
            payload["model"] = self.model_state()
        if cfg.save_inner_lrs:  # the LSLR table when learned, else the fixed rate
            lrs = self.learner.inner_lrs()
            payload["inner_lrs"] = lrs.detach().cpu() if isinstance(lrs, torch.Tensor) else lrs
        if cfg.save_msl_weights and self.learner.current_msl_weights(self.epoch) is not None:
            payload["msl_weights"] = self.learner.current_msl_weights(self.epoch).detach().cpu()
        if cfg.save_rng_state:
            payload["rng"] = rng_state()
        if cfg.save_sampler_config:
            payload["sampler"] = self.samplers["train"].state_dict()
        return payload

    def model_state(self) -> dict:
        """The full (unsharded) weights; a collective under FSDP, so every rank calls it."""
        return self.learner.model_state_dict()

    def save(self, name: str) -> Path | None:
        if self.sharded_checkpoints:
            return self._save_sharded(name)
        payload = self._payload() if self.learner.collective or self.rank == 0 else None
        if self.rank != 0:
            return None
        path = save_checkpoint(self.ckpt_dir / name, payload)
        if name.startswith("step-"):
            for old in step_checkpoints(self.ckpt_dir)[self.config.checkpoint.keep_last:]:
                old.unlink(missing_ok=True)
        save_checkpoint(self.ckpt_dir / "last.pt", payload) if name != "last.pt" else None
        return path

    def _save_sharded(self, name: str) -> Path:
        """A collective: every rank writes its shards into step-N.dcp/ (or best.dcp/); no last.pt,
        the newest step folder is the resume point."""
        payload = self._payload(sharded=True)
        path = save_sharded(self.checkpoint_path(name), self.learner.sharded_state_dict(), payload)
        if self.rank == 0 and name.startswith("step-"):
            for old in step_checkpoints(self.ckpt_dir)[self.config.checkpoint.keep_last:]:
                remove_checkpoint(old)
        return path

    def _latest_intact(self) -> tuple[dict, Path]:
        """load_latest_intact on rank 0 (which alone checks the checksums of a sharded folder);
        the other ranks take its choice, so every rank resumes from the same checkpoint."""
        if self.world_size == 1:
            return load_latest_intact(self.ckpt_dir)
        import torch.distributed as dist
        choice = [None]
        if self.rank == 0:
            try:
                data, path = load_latest_intact(self.ckpt_dir)
                choice = [str(path)]
            except CheckpointError as exc:
                choice = [CheckpointError(str(exc))]
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], Exception):
            raise choice[0]
        path = Path(choice[0])
        if self.rank != 0:  # rank 0 checked the folder's files; the others read its checksummed meta.pt
            data = load_checkpoint(path / "meta.pt" if is_sharded_checkpoint(path) else path)
        return data, path
    def _resume(self) -> None:
        data, path = self._latest_intact()
        saved = checkpoint_part(data, "config", path)
        factory = (saved.get("model") or {}).get("factory")
        if factory is not None and self.config.model.factory is None:
            raise CheckpointError(f"cannot resume {path}: the run was trained with the model factory {factory!r}; pass "
                                  f"--model {factory} again to resume it (from Python: model.factory in the config)")
        diffs = config_differences(saved, self.config.to_dict())
        if diffs:
            raise CheckpointError("cannot resume: the config differs from the checkpoint's in fields that shape "
                                  "training:\n  " + "\n  ".join(diffs))
        if data.get("data") != self.data_fingerprint():
            raise CheckpointError(f"cannot resume from {path}: it was trained on other data\n  checkpoint: "
                                  f"{data.get('data')}\n  now:        {self.data_fingerprint()}")
        if is_sharded_checkpoint(path):
            if not self.sharded_checkpoints:
                raise CheckpointError(f"cannot resume from {path}: a sharded (FSDP) checkpoint resumes a run with "
                                      "run.sharding=fsdp; evaluate it with meta-kernels eval")
            state = self.learner.sharded_state_dict()
            load_sharded(path, state)  # resharded to this run's ranks
            self.learner.load_sharded_state_dict(state, data["learner"]["outer_steps"])
        else:
            self.learner.load_model_state_dict(data["model"])
            self.learner.load_state_dict(data["learner"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(data["scheduler"])
        c = data["counters"]
        self.epoch, self.step, self.global_step, self.best_val = c["epoch"], c["step"], c["global_step"], c["best_val"]
        self.history = data.get("history", [])
        self.trained_seconds = data.get("trained_seconds", 0.0)
        if "rng" in data:
            set_rng_state(data["rng"])

    # ---- training ----------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> dict:
        """Trains to the configured number of epochs, or until global step `max_steps` (a resumed
        run counts the steps before it), and saves the step it stops at. On SIGTERM, SIGINT or
        the preemption signal (single-process runs) it saves the current step and raises
        TrainingInterrupted."""
        if max_steps is not None and self.global_step >= max_steps and self.rank == 0:
            warnings.warn(f"max_steps={max_steps} (--max-steps {max_steps}): the run in {self.out} is already at step "
                          f"{self.global_step}, past it, so there is nothing to train; raise --max-steps to continue it",
                          stacklevel=2)
        lock = run_folder_lock(self.out) if self.rank == 0 else contextlib.nullcontext()
        with lock, self._stop_signals() as stop:
            return self._fit(max_steps, stop)

    def _fit(self, max_steps: int | None, stop: dict) -> dict:
        cfg = self.config
        B = cfg.maml.meta_batch_size
        sampler = self.samplers["train"]
        steps_per_epoch = sampler.steps_per_epoch(B)
        done, saved_step = 0, None
        start = self._fit_start = time.perf_counter()
        budget = math.inf if cfg.run.max_minutes is None else 60.0 * cfg.run.max_minutes
        # The budget is checked only after a step of this fit, so each fit (and resume) makes progress.
        finished = lambda: ((max_steps is not None and self.global_step >= max_steps) or stop["signal"] is not None
                            or (done > 0 and self._out_of_time(time.perf_counter() - start, budget)))
        try:
            while self.epoch < cfg.run.epochs and not finished():
                bar = tqdm(range(self.step, steps_per_epoch), desc=f"epoch {self.epoch}", disable=not self.progress,
                           unit="step", mininterval=1.0)
                for step in bar:
                    if finished():
                        break
                    batch = sampler.meta_batch(self.epoch, step, B, *self.learner.task_share()).to(cfg.run.device)
                    # Inner-step logs are opt-in (MetaLearner only; the config refuses them under FSDP).
                    inner = {"log_inner_steps": True} if cfg.run.log_inner_steps else {}
                    metrics = self.learner.step(batch, epoch=self.epoch, total_tasks=B, **inner)
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.step, self.global_step, done = step + 1, self.global_step + 1, done + 1
                    record = strict_json({"split": "train", "epoch": self.epoch, "step": step,
                                          "global_step": self.global_step, **metrics,
                                          "tasks_per_s": done * B / (time.perf_counter() - start)})
                    self.history.append(record)
                    self.log(record)
                    bar.set_postfix(loss=f"{metrics[self.loss_key]:.3f}", acc=f"{metrics['post_adapt_acc']:.3f}",
                                    tasks_s=f"{record['tasks_per_s']:.0f}")
                    if self.global_step % cfg.run.val_every == 0 and (self.rank == 0 or self.learner.collective):
                        val = self.evaluate("val", cfg.run.val_episodes)
                        val_record = strict_json({"split": "val", "global_step": self.global_step,
                                                  "elapsed_s": round(time.perf_counter() - start, 2), **val})
                        self.history.append(val_record)
                        self.log(val_record)
                        if val["accuracy"] > self.best_val:
                            self.best_val = val["accuracy"]
                            self.save("best.pt")
                    self.flush_loggers()  # before the checkpoint: every checkpointed step is in the logs
                    if self.global_step % cfg.checkpoint.every_steps == 0:
                        self.save(f"step-{self.global_step}.pt")
                        saved_step = self.global_step
                if self.step == steps_per_epoch:
                    self.epoch, self.step = self.epoch + 1, 0
            if done and saved_step != self.global_step:
                self.save(f"step-{self.global_step}.pt")
        finally:
            self.flush_loggers()
            self.trained_seconds, self._fit_start = self._seconds(), None
        if stop["signal"] is not None:
            last = self.checkpoint_path(f"step-{self.global_step}.pt") if self.sharded_checkpoints else None
            raise TrainingInterrupted(stop["signal"], self.global_step, last or self.ckpt_dir / "last.pt")
        return self._summary(time.perf_counter() - start)

    def _seconds(self) -> float:
        """Seconds trained by this run, its earlier fits included."""
        return self.trained_seconds + (0.0 if self._fit_start is None else time.perf_counter() - self._fit_start)

    def _clock(self) -> float:
        """_seconds, under torchrun rank 0's, so that a schedule that follows it gives every rank the
        same learning rate (a collective: every rank calls it)."""
        seconds = self._seconds()
        if self.world_size == 1 or self._fit_start is None:
            return seconds
        value = torch.tensor([seconds], dtype=torch.float64, device=self.config.run.device)
        distributed.broadcast_([value])
        return float(value.item())

    def _out_of_time(self, elapsed: float, budget: float) -> bool:
        """Past run.max_minutes; under torchrun rank 0's clock decides, so every rank stops at the same step."""
        if budget == math.inf:
            return False
        if self.world_size == 1:
            return elapsed >= budget
        flag = torch.tensor([float(elapsed >= budget)], device=self.config.run.device)
        distributed.broadcast_([flag])
        return bool(flag.item())

    # ---- loggers -------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Sends a record (with "split" and "global_step") to every logger; on rank 0 only."""
        record = strict_json(record)
        for logger in self.loggers:
            logger.log(record)

    def flush_loggers(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        """Closes the loggers (TensorBoard's writer, the W&B run); call it when done with the run."""
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    @contextlib.contextmanager
    def _stop_signals(self):
        """A stop request by signal, honoured at the next step boundary. Single-process runs only:
        under torchrun a rank that waits for a step boundary would hang its peers' collectives,
        and torchrun restarts from the checkpoints instead."""
        stop = {"signal": None}
        signals = STOP_SIGNALS + ((self.preempt_signal,) if self.preempt_signal is not None else ())
        if self.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield stop
            return

        def request(signum, frame):
            if stop["signal"] is not None:  # a second signal: stop now, without saving
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
            stop["signal"] = signum

        previous = {s: signal.signal(s, request) for s in signals}
        try:
            yield stop
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _summary(self, seconds: float) -> dict:
        train = [h for h in self.history if h["split"] == "train"]
        vals = [h for h in self.history if h["split"] == "val"]
        k = max(1, min(10, len(train) // 2))
        m = self.config.maml
        summary = {"inner_loop": {"algo": m.algo, "inner_steps": m.inner_steps, "inner_lr": m.inner_lr,
                                  "inner_clip": m.inner_clip, "engine": InnerLoopSettings.from_config(m).engine},
                   "global_step": self.global_step, "epoch": self.epoch, "seconds": round(seconds, 2),
                   "train_loss": self.loss_key,
                   "train_loss_first": float(np.mean([h[self.loss_key] for h in train[:k]])) if train else None,
                   "train_loss_last": float(np.mean([h[self.loss_key] for h in train[-k:]])) if train else None,
                   "best_val_accuracy": self.best_val if vals else None,
                   "last_val": vals[-1] if vals else None}
        if self.rank == 0:
            (self.out / "metrics.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
            self.plot_training()
        return summary

    # ---- evaluation --------------------------------------------------------------------------
    @property
    def loss_key(self) -> str:
        """Reptile's outer step makes no query pass: its training loss is the support loss."""
        return "support_loss" if self.config.maml.algo == "reptile" else "query_loss"

    def evaluate(self, split: str, episodes: int, sampler: EpisodeSampler | None = None) -> dict:
        """Accuracy over `episodes` tasks (mean, 95% CI) and the adaptation curve after 0..K steps
        (Learner.evaluate); the weights and running statistics stay as they are."""
        batches = evaluation_batches(sampler or self.samplers[split], episodes, self.config.maml.meta_batch_size,
                                     self.config.run.device)
        return self.learner.evaluate(batches)

    def plot_training(self) -> None:
        plot_training(self.history, self.out / "training_curves.png")


def plot_training(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [h for h in history if h["split"] == "train"]
    vals = [h for h in history if h["split"] == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    key = "support_loss" if train and "support_loss" in train[0] else "query_loss"
    ax1.plot([h["global_step"] for h in train], [h[key] for h in train], lw=0.8)
    ax1.set_xlabel("outer step")
    ax1.set_ylabel(f"meta-train {key.replace('_', ' ')}")
    ax2.plot([h["global_step"] for h in train], [h["post_adapt_acc"] for h in train], lw=0.8, label="train (post-adapt)")
    if vals:
        ax2.plot([h["global_step"] for h in vals], [h["accuracy"] for h in vals], "o-", label="validation")
    ax2.set_xlabel("outer step")
    ax2.set_ylabel("query accuracy")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_adaptation_curve(curve: list[float], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(range(len(curve)), curve, "o-")
    ax.set_xlabel("inner step")
    ax.set_ylabel("query accuracy")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkpoint_part(data, key: str, path) -> dict:
    """data[key] of a loaded checkpoint ('config', 'model'), or an error saying the file is not a
    complete meta_kernels training checkpoint."""
    what = {"config": "config", "model": "model weights"}.get(key, repr(key))
    if not isinstance(data, dict) or not isinstance(data.get(key), dict):
        raise CheckpointError(f"{path} holds no {what} (its '{key}' entry is missing or not a mapping): not a "
                              "complete meta_kernels training checkpoint; pass one that meta-kernels train saved "
                              "(checkpoints/best.pt, last.pt or step-N.pt)")
    return data[key]


def check_checkpoint_factory(path, config: MetaLearningFullConfig, factory: str | None) -> None:
    """A checkpoint never chooses code to import: a model factory it names is imported only when
    the caller names the same one (`factory`, `--model` on the command line)."""
    wanted = config.model.factory
    if wanted is None and factory is not None:
        raise CheckpointError(f"--model {factory} (factory={factory!r}): {path} has no model factory: its model is "
                              f"built in (arch {config.model.arch!r}), so --model is not needed; leave it out")
    if wanted is None or factory == wanted:
        return
    named = "" if factory is None else f"; you named {factory!r}, which is not it"
    raise CheckpointError(f"{path}: its model is built by the factory {wanted!r} (config model.factory), code that a "
                          f"checkpoint file is not trusted to choose, so nothing was imported{named}. If you trust it, "
                          f"name it: --model {wanted} (from Python: factory={wanted!r})")


def load_checkpoint_model(path: str | os.PathLike, data: dict, config: MetaLearningFullConfig,
                          image_shape, factory: str | None = None) -> torch.nn.Module:
    """The checkpoint's model, unsharded in this process (`data`: load_any_checkpoint(path)). A
    sharded folder's shards are read into the plain model by DCP without a process group. A model
    of the user's own (config model.factory) is built only when `factory` names that factory."""
    check_checkpoint_factory(path, config, factory)
    model = build_model(config, image_shape)
    if is_sharded_checkpoint(path):
        state = {"model": model.state_dict()}
        load_sharded(path, state, collective=False)
        model.load_state_dict(state["model"])
    else:
        weights = checkpoint_part(data, "model", path)
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            missing, unexpected = _key_differences(model.state_dict(), weights)
            built = f"the factory {config.model.factory!r}" if config.model.factory else f"arch {config.model.arch!r}"
            raise CheckpointError(f"{path}: the model built by {built} does not match the checkpoint's weights: "
                                  f"missing {missing[:6] or 'none'}, unexpected {unexpected[:6] or 'none'}"
                                  f"{'' if missing or unexpected else ' (' + _size_mismatch(exc) + ')'}; "
                                  "evaluate it with the model it was trained with") from exc
    return model


def _size_mismatch(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return next((line.strip() for line in lines if "size mismatch" in line), lines[0] if lines else "")[:200]


def _key_differences(built: dict, saved: dict) -> tuple[list[str], list[str]]:
    return sorted(set(built) - set(saved)), sorted(set(saved) - set(built))


def evaluate_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, episodes: int | None = None,
                        split: str = "test", loggers: list[Logger] = (), *, inner_steps: int | None = None,
                        q_query: int | None = None, k_shot: int | None = None, factory: str | None = None) -> dict:
    """Loads a checkpoint (a file, or a sharded run's step-N.dcp folder) and evaluates it on
    `split` episodes; writes eval.json and a plot, and sends the result to `loggers` (started
    ones, e.g. Trainer.loggers) at the checkpoint's step. inner_steps / q_query: the test-time
    inner steps and query images per class when a paper's protocol differs from training (MAML
    trains Omniglot with 1 step and tests with 3); k_shot: test shots when training used others
    (Reptile trains with 10 or 15); None: the run's. eval.json records the protocol used (episodes, n_way, k_shot, q_query, inner steps and rate, split).
    factory: the model factory of a run on the user's own model, which must equal the checkpoint's
    (a checkpoint never makes us import code by itself)."""
    data = load_any_checkpoint(path)
    config = MetaLearningFullConfig.from_dict(checkpoint_part(data, "config", path))
    check_checkpoint_factory(path, config, factory)
    trained = config.maml.inner_steps
    steps = trained if inner_steps is None else inner_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
    # Learned per-step state cannot be stretched to another number of steps: refuse, don't guess.
    if steps != trained and config.mamlpp.use_lslr:
        raise ValueError(f"inner_steps={steps}: this run learned one inner rate per step (LSLR) for {trained} steps; "
                         f"evaluate it with {trained}")
    if steps > trained and config.mamlpp.bn_mode == "per_step":
        raise ValueError(f"inner_steps={steps}: this run learned per-step BatchNorm for {trained} steps; evaluate "
                         f"it with at most {trained}")
    out = _writable_dir(Path(out_dir))
    dataset = load_split(config, split)
    model = load_checkpoint_model(path, data, config, dataset.image_shape, factory)  # the trained steps' BN rows
    # Evaluated unsharded whatever the run's sharding: it needs no process group.
    learner = MetaLearner(model, config.maml.replace(inner_steps=steps), mamlpp=config.mamlpp)
    saved_lrs = data.get("inner_lrs")
    if isinstance(saved_lrs, torch.Tensor):  # the learned (LSLR) rates
        with torch.no_grad():
            learner.lslr.copy_(saved_lrs)
    if config.maml.inner_state == "carried":  # Reptile's inner Adam starts where training left it
        learner.load_carried_state(data["learner"].get("carried_inner_state"))
    changes = {k: v for k, v in (("q_query", q_query), ("k_shot", k_shot)) if v is not None}
    episode_config = config.episodes.replace(**changes)  # validated like any EpisodeConfig
    sampler = EpisodeSampler(dataset, episode_config, seed=config.run.seed + SPLIT_SEEDS[split])
    count = episodes or config.run.test_episodes
    result = learner.evaluate(evaluation_batches(sampler, count, config.maml.meta_batch_size,
                                                 next(model.parameters()).device))
    result.update({"checkpoint": str(path), "split": split, "algo": config.maml.algo})
    ep = episode_config
    protocol = {"episodes": result["episodes"], "n_way": ep.n_way, "k_shot": ep.k_shot, "q_query": ep.q_query,
                "inner_steps": steps, "trained_inner_steps": trained, "inner_lr": config.maml.inner_lr,
                "inner_lr_learned": config.mamlpp.use_lslr, "split": split, "dataset": ep.dataset,
                "bn_mode": config.mamlpp.bn_mode, "ci": "95% (1.96 standard errors over episodes)"}
    if ep.dataset == "omniglot":
        protocol.update(omniglot_variant=config.run.omniglot_variant, omniglot_split=config.run.omniglot_split)
    (out / "eval.json").write_text(json.dumps(strict_json({**result, "protocol": protocol}), indent=2,
                                              allow_nan=False))
    record = strict_json({"split": split, "global_step": data.get("counters", {}).get("global_step"), **result})
    for logger in loggers:  # the protocol stays in eval.json: loggers take flat scalar records
        logger.log(record)
    plot_adaptation_curve(result["curve_accuracy"], out / "adaptation_curve.png",
                          f"{config.maml.algo} {ep.n_way}-way {ep.k_shot}-shot ({split})")
    return {**result, "protocol": protocol}
