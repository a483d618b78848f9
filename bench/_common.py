"""Shared by the benchmarks: the Conv4 parameter set, interleaved timing and the machine record."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch


def conv4_shapes(in_channels: int = 1, filters: int = 64, n_way: int = 5, feature_dim: int | None = None):
    """Parameter shapes of Conv4 (4 x [conv3x3, BN, ReLU, pool2] + linear head): 18 tensors,
    112,261 parameters for Omniglot (1 x 28 x 28, 64 filters, 5-way)."""
    shapes, c_in = [], in_channels
    for _ in range(4):
        shapes += [(filters, c_in, 3, 3), (filters,), (filters,), (filters,)]  # conv w, conv b, bn w, bn b
        c_in = filters
    feature_dim = feature_dim or filters
    return shapes + [(n_way, feature_dim), (n_way,)]


def interleaved_medians(fns: dict, rounds: int = 15, inner: int = 5, warmup: int = 3) -> dict:
    """Median seconds per call of each function, timed in alternation (A, B, A, B, ...) so that
    load from elsewhere on a shared machine hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def reset_peak_rss() -> None:
    """Linux: restart the peak-RSS counter (VmHWM) of this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return kb / 1e6


def step_memory(step) -> dict:
    """Memory of one outer step, in a fresh process: the RSS growth of a first call of `step()`
    and the peak of tensor memory allocated during a second (peak_memory.py says why both)."""
    import resource
    from peak_memory import peak_allocated_cpu
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024
    step()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"rss_gb": rss / 1e9, "allocated_gb": peak_allocated_cpu(step) / 1e9}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = "unknown"
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def higher_outer_step(model, loss, inner_lr: float, meta_lr: float, algo: str, steps: int):
    """One outer step of MAML / FOMAML written with higher.innerloop_ctx, task by task (the peer):
    step(batch) for a batch (x_support, y_support, x_query, y_query), each [T, N, ...]."""
    import higher
    opt = torch.optim.Adam(model.parameters(), lr=meta_lr)
    inner = torch.optim.SGD(model.parameters(), lr=inner_lr)
    detach = (lambda grads: [g.detach() for g in grads]) if algo == "fomaml" else None

    def call(fmodel, x, t):  # a tensor input, or keyword inputs (token ids); logits of model outputs
        out = fmodel(**{k: v[t] for k, v in x.items()}) if isinstance(x, dict) else fmodel(x[t])
        return getattr(out, "logits", out)

    def step(batch):
        xs, ys, xq, yq = batch
        T = ys.shape[0]
        opt.zero_grad()
        for t in range(T):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss(call(fmodel, xs, t), ys[t]), grad_callback=detach)
                (loss(call(fmodel, xq, t), yq[t]) / T).backward()
        opt.step()
    return step


def plot_curves(curves: dict, path, xlabel: str, ylabel: str, title: str, *, hlines=(), ylim=None) -> None:
    """One line per entry of curves {label: (x, y)}, dashed horizontal lines at `hlines`, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker=".", label=label)
    for h in hlines:
        ax.axhline(h, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
