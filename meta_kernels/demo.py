"""Sinusoid regression meta-training (Finn et al. 2017) end to end, with no download: MAML on
an MLP 1-40-40-1, K-shot tasks, then the adaptation of held-out tasks before and after."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from meta_kernels.config import MAMLConfig
from meta_kernels.data.sinusoid import SinusoidTasks
from meta_kernels.meta import MetaLearner, adapt
from meta_kernels.models import MLP

EVAL_EPOCH = 1  # held-out tasks come from another epoch of the task stream than training


def evaluate(model, tasks: SinusoidTasks, n_tasks: int, steps: int, inner_lr: float) -> list[float]:
    """Mean query MSE over held-out tasks after 0..steps inner updates."""
    batch, _, _ = tasks.sample(EVAL_EPOCH, 0, n_tasks)
    params = dict(model.named_parameters())
    curve = []
    for k in range(steps + 1):
        if k == 0:
            adapted = {n: p.detach().expand(n_tasks, *p.shape) for n, p in params.items()}
        else:
            with torch.no_grad():
                adapted, _ = adapt(params, batch.support, model=model, steps=k, lrs=inner_lr, first_order=True,
                                   loss="mse")
        with torch.no_grad():
            pred = MLP.forward_tasks(adapted, batch.x_query)
        curve.append(float((pred - batch.y_query).pow(2).mean()))
    return curve


def plot(model, tasks: SinusoidTasks, history: list[float], curve: list[float], inner_lr: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batch, amp, phase = tasks.sample(EVAL_EPOCH, 1, 3)
    params = dict(model.named_parameters())
    xs = torch.linspace(-5, 5, 200).view(1, -1, 1).expand(3, -1, -1)
    with torch.no_grad():
        before = MLP.forward_tasks({n: p.expand(3, *p.shape) for n, p in params.items()}, xs)
        one, _ = adapt(params, batch.support, model=model, steps=1, lrs=inner_lr, first_order=True, loss="mse")
        ten, _ = adapt(params, batch.support, model=model, steps=10, lrs=inner_lr, first_order=True, loss="mse")
        after1, after10 = MLP.forward_tasks(one, xs), MLP.forward_tasks(ten, xs)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for t in range(3):
        ax = axes[t]
        ax.plot(xs[t, :, 0], SinusoidTasks.function(amp[t:t + 1], phase[t:t + 1], xs[t:t + 1])[0, :, 0], "k-", label="true")
        ax.plot(xs[t, :, 0], before[t, :, 0], ":", color="tab:gray", label="before adaptation")
        ax.plot(xs[t, :, 0], after1[t, :, 0], "--", color="tab:blue", label="after 1 step")
        ax.plot(xs[t, :, 0], after10[t, :, 0], "-", color="tab:green", label="after 10 steps")
        ax.scatter(batch.x_support[t, :, 0], batch.y_support[t, :, 0], color="tab:red", zorder=5, label="support (K shots)")
        ax.set_title(f"held-out task {t + 1}")
    axes[0].legend(fontsize=7)
    axes[3].plot(history, lw=0.6, color="tab:purple")
    axes[3].set_yscale("log")
    axes[3].set_title("meta-training query MSE")
    axes[3].set_xlabel("outer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str | Path = "runs/demo", *, outer_steps: int = 4000, meta_batch_size: int = 25, k_shot: int = 10,
             inner_steps: int = 1, inner_lr: float = 0.01, meta_lr: float = 1e-3, seed: int = 0,
             progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The MLP's ops are tiny: one thread avoids OpenMP wake-ups costing more than the work, and
    # spin-waiting threads slowing down many-fold when something else runs on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_report(out, outer_steps, meta_batch_size, k_shot, inner_steps, inner_lr, meta_lr, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train_and_report(out: Path, outer_steps, meta_batch_size, k_shot, inner_steps, inner_lr, meta_lr, seed,
                      progress) -> dict:
    torch.manual_seed(seed)
    tasks = SinusoidTasks(k_shot=k_shot, q_query=k_shot, seed=seed)
    model = MLP((1, 40, 40, 1))
    cfg = MAMLConfig(algo="maml", inner_steps=inner_steps, inner_lr=inner_lr, inner_clip=None, engine="custom",
                     loss="mse", meta_lr=meta_lr, meta_batch_size=meta_batch_size)
    learner = MetaLearner(model, cfg)
    before = evaluate(model, tasks, 100, 10, inner_lr)
    history = []
    start = time.perf_counter()
    bar = tqdm(range(outer_steps), desc="meta-train sinusoid", disable=not progress, unit="step", mininterval=1.0)
    with (out / "metrics.jsonl").open("w") as log:
        for step in bar:
            batch, _, _ = tasks.sample(0, step, meta_batch_size)
            metrics = learner.step(batch)
            history.append(metrics["query_loss"])
            if step % 50 == 0 or step == outer_steps - 1:
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                bar.set_postfix(query_mse=f"{metrics['query_loss']:.3f}",
                                tasks_per_s=f"{(step + 1) * meta_batch_size / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    after = evaluate(model, tasks, 100, 10, inner_lr)
    summary = {"outer_steps": outer_steps, "meta_batch_size": meta_batch_size, "k_shot": k_shot,
               "inner_steps": inner_steps, "inner_lr": inner_lr, "train_seconds": round(seconds, 2),
               "heldout_mse_by_inner_step_before_meta_training": before,
               "heldout_mse_by_inner_step_after_meta_training": after,
               "train_query_mse_first_50": sum(history[:50]) / min(50, len(history)),
               "train_query_mse_last_50": sum(history[-50:]) / min(50, len(history))}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    plot(model, tasks, history, after, inner_lr, out / "sinusoid.png")
    if not all(math.isfinite(v) for v in after):
        raise FloatingPointError(f"held-out MSE is not finite: {after}")
    return summary
