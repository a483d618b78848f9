"""Time to accuracy: wall-clock seconds and outer steps until the validation accuracy first reaches
90% and 95%, for our MetaLearner and for a plain per-task loop built on higher, trained with the
same model, initial weights, hyperparameters, data, episode stream and seed.

Task: 5-way 1-shot Omniglot, the two "background small" sets, split on characters (train / val /
test class-disjoint); validation on the same fixed held-out (val) episodes every --val-every
steps, each implementation's weights adapted by one shared evaluator. The clock counts training
only (sampling the meta-batch and the outer step), not the validations, which are the same work
for both. Each implementation stops at the last threshold or at --max-steps / --max-seconds.

    python bench/time_to_accuracy.py          # writes bench/results/time_to_accuracy.{json,png}

Reads the data from $META_KERNELS_DATA/omniglot (or --data-root, the omniglot folder). Run it on a
quiet machine: it is a benchmark."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import meta_kernels as mk  # noqa: E402
from meta_kernels.config import EpisodeConfig, MetaLearningFullConfig, RunConfig  # noqa: E402
from meta_kernels.data import EpisodeSampler  # noqa: E402
from meta_kernels.train import evaluation_batches, load_split  # noqa: E402
from meta_kernels.models import sequential_conv4  # noqa: E402
from _common import higher_outer_step, machine, plot_curves  # noqa: E402

THRESHOLDS = (0.90, 0.95)
IMPLEMENTATIONS = ("ours", "higher")


@dataclass
class Settings:
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 5  # per class in training episodes
    val_query: int = 15  # per class in validation episodes
    algo: str = "maml"
    inner_steps: int = 1  # Finn et al.: one step at lr 0.4 in training on Omniglot
    eval_inner_steps: int = 3  # and three at test time
    inner_lr: float = 0.4
    meta_lr: float = 1e-3
    meta_batch: int = 32
    filters: int = 64
    seed: int = 0
    val_every: int = 25
    val_episodes: int = 200
    max_steps: int = 3000
    max_seconds: float = 3600.0
    data_root: str | None = None


@dataclass
class Curve:
    """One implementation's run: validation points (step, training seconds, accuracy)."""
    impl: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    episodes: list[str] = field(default_factory=list)  # a digest of each meta-batch trained on, in order

    def add(self, step: int, seconds: float, accuracy: float) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.accuracy.append(accuracy)


def first_crossing(curve: Curve, threshold: float) -> dict | None:
    """The first validation point at or above `threshold` (its step and training seconds), or None."""
    for step, seconds, acc in zip(curve.steps, curve.seconds, curve.accuracy):
        if acc >= threshold:
            return {"step": step, "seconds": seconds, "accuracy": acc}
    return None


def reached_goal(curve: Curve, thresholds=THRESHOLDS) -> bool:
    """The stopping rule: the last validation point reached the highest threshold."""
    return bool(curve.accuracy) and curve.accuracy[-1] >= max(thresholds)


def samplers(s: Settings) -> tuple[EpisodeSampler, EpisodeSampler]:
    """The training stream and the validation episodes, the same for every implementation."""
    config = MetaLearningFullConfig(run=RunConfig(omniglot_variant="small", data_root=s.data_root))
    train_cfg = EpisodeConfig(n_way=s.n_way, k_shot=s.k_shot, q_query=s.q_query, episodes_per_epoch=10**7)
    val_cfg = EpisodeConfig(n_way=s.n_way, k_shot=s.k_shot, q_query=s.val_query, episodes_per_epoch=s.val_episodes)
    return (EpisodeSampler(load_split(config, "train"), train_cfg, seed=s.seed),
            EpisodeSampler(load_split(config, "val"), val_cfg, seed=s.seed + 1))


def build_model(s: Settings) -> torch.nn.Module:
    torch.manual_seed(s.seed)
    return sequential_conv4(s.n_way, in_channels=1, filters=s.filters)


def outer_step(impl: str, model: torch.nn.Module, s: Settings):
    """step(batch) training `model` in place; batch = (x_support, y_support, x_query, y_query), [T, ...]."""
    if impl == "ours":
        cfg = mk.MAMLConfig(algo=s.algo, inner_steps=s.inner_steps, inner_lr=s.inner_lr, inner_clip=None,
                            engine="custom", meta_lr=s.meta_lr, meta_batch_size=s.meta_batch)
        learner = mk.MetaLearner(model, cfg)
        return learner.step
    if impl == "higher":
        return higher_outer_step(model, F.cross_entropy, s.inner_lr, s.meta_lr, s.algo, s.inner_steps)
    raise ValueError(f"unknown implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")


class Validator:
    """Validation accuracy of any model's weights on fixed episodes, by one evaluator for all."""

    def __init__(self, s: Settings, val: EpisodeSampler):
        self.model = build_model(s)
        cfg = mk.MAMLConfig(algo="maml", inner_steps=s.eval_inner_steps, inner_lr=s.inner_lr, inner_clip=None,
                            engine="custom", meta_batch_size=s.meta_batch)
        self.learner = mk.MetaLearner(self.model, cfg)
        self.batches = list(evaluation_batches(val, s.val_episodes, s.meta_batch, "cpu"))

    def __call__(self, model: torch.nn.Module) -> float:
        self.model.load_state_dict(model.state_dict())
        return self.learner.evaluate(self.batches)["accuracy"]


def train_curve(impl: str, s: Settings, train: EpisodeSampler, validate, thresholds=THRESHOLDS,
                progress: bool = True) -> Curve:
    """Trains a fresh model with `impl` until the stopping rule, --max-steps or --max-seconds."""
    from tqdm import tqdm
    model = build_model(s)
    step_fn = outer_step(impl, model, s)
    curve, clock = Curve(impl), 0.0
    curve.add(0, 0.0, validate(model))
    bar = tqdm(total=s.max_steps, desc=impl, unit="step", disable=not progress, mininterval=1.0)
    for step in range(1, s.max_steps + 1):
        start = time.perf_counter()
        batch = train.meta_batch(0, step - 1, s.meta_batch)
        step_fn((batch.x_support, batch.y_support, batch.x_query, batch.y_query))
        clock += time.perf_counter() - start
        curve.episodes.append(episode_digest(batch))
        bar.update(1)
        if step % s.val_every == 0 or step == s.max_steps or clock >= s.max_seconds:
            curve.add(step, clock, validate(model))
            bar.set_postfix(val_acc=f"{curve.accuracy[-1]:.3f}", train_s=f"{clock:.0f}")
            if reached_goal(curve, thresholds) or clock >= s.max_seconds:
                break
    bar.close()
    return curve


def episode_digest(batch) -> str:
    h = hashlib.sha256(batch.x_support.numpy().tobytes())
    h.update(batch.x_query.numpy().tobytes())
    return h.hexdigest()[:16]


def same_episodes(curves: dict[str, Curve]) -> bool:
    """Every implementation trained on the same meta-batches in the same order (as far as both ran)."""
    lists = [c.episodes for c in curves.values()]
    n = min(len(e) for e in lists)
    return all(e[:n] == lists[0][:n] for e in lists)


def summary(curves: dict[str, Curve], thresholds=THRESHOLDS) -> dict:
    """Per implementation and threshold: the first crossing; and ours' speed-up in time and steps."""
    out = {impl: {f"{t:.2f}": first_crossing(c, t) for t in thresholds} for impl, c in curves.items()}
    if "ours" in curves and "higher" in curves:
        out["speedup"] = {}
        for t in thresholds:
            a, b = out["ours"][f"{t:.2f}"], out["higher"][f"{t:.2f}"]
            out["speedup"][f"{t:.2f}"] = (None if a is None or b is None else
                                         {"time": round(b["seconds"] / a["seconds"], 2), "steps": b["step"] / a["step"]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in Settings.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
        parser.add_argument(flag, type=kind, default=f.default)
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--out", default=str(HERE / "results" / "time_to_accuracy"))
    args = parser.parse_args(argv)
    s = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    train, val = samplers(s)
    validate = Validator(s, val)
    curves = {impl: train_curve(impl, s, train, validate) for impl in args.impl}
    result = {"machine": machine(), "settings": vars(s), "same_episodes": same_episodes(curves),
              "summary": summary(curves),
              "curves": {k: {"steps": c.steps, "seconds": c.seconds, "accuracy": c.accuracy} for k, c in curves.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_curves({k: (c.seconds, c.accuracy) for k, c in curves.items()}, out.with_suffix(".png"),
                "training wall-clock seconds (validation excluded)",
                f"validation accuracy ({s.val_episodes} held-out episodes)",
                f"Omniglot small, {s.n_way}-way {s.k_shot}-shot, {s.algo.upper()}, meta-batch {s.meta_batch}",
                hlines=THRESHOLDS, ylim=(0.2, 1.0))
    print(json.dumps(result["summary"], indent=2))
    print(f"same episodes in the same order: {result['same_episodes']}; written {out}.json / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
