"""One outer step of MAML (second order), FOMAML and Reptile on Conv4, Omniglot 28x28 5-way
1-shot 15-query, inner lr 0.4, Adam 1e-3: ours against the libraries people use today, in the
same run and in alternation (shared-machine noise hits all alike).

Run: pytest bench/bench_meta_step.py --benchmark-json=bench/results/meta_step.json
     python bench/summarize.py bench/results/meta_step.json

Implementations:
  ours            MetaLearner, engine='custom', tasks batched (grouped conv, per-task BN op, fused updates)
  ours-torch_func the default engine (torch.func.grad inside, fused updates outside)
  ours-no-batch   ours with the task batching switched off (a loop over tasks)
  ours-compiled   ours with compile=True
  ours-<variant>  ours with the memory settings of MEMORY_VARIANTS (task_chunk: tasks adapted
                  together; query_chunk: tasks per query pass, default 8; recompute_inner:
                  MAML's inner graph rebuilt one step at a time in the backward)
  plain-loop      functional_call + autograd.grad(create_graph=True), a Python loop over tasks
  plain-vmap      the same per-task function under torch.func.vmap (MAML only)
  higher          higher.innerloop_ctx per task
learn2learn 0.2.0 does not install here (its sdist needs its Cython sources regenerated on
Python 3.11), so it is not in the table.
"""
from __future__ import annotations

import importlib.util
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import meta_kernels as mk
from _common import higher_outer_step, machine, peak_rss_gb, reset_peak_rss

N_WAY, K_SHOT, Q_QUERY, INNER_LR, META_LR = 5, 1, 15, 0.4, 1e-3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every implementation runs in this process with glibc reusing freed memory (what the trainer does
# on CPUs; see meta_kernels.malloc_tuning), so RSS growth no longer shows a step's peak: peak memory
# comes from peak_memory.py, one fresh process per implementation.
if DEVICE == "cpu":
    mk.keep_freed_cpu_memory()


def _batch(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(T, N_WAY * K_SHOT, 1, 28, 28, generator=g)
    xq = torch.rand(T, N_WAY * Q_QUERY, 1, 28, 28, generator=g)
    ys = torch.arange(N_WAY).repeat_interleave(K_SHOT).repeat(T, 1)
    yq = torch.arange(N_WAY).repeat_interleave(Q_QUERY).repeat(T, 1)
    return tuple(t.to(DEVICE) for t in (xs, ys, xq, yq))


def _model():
    torch.manual_seed(0)
    return mk.Conv4.omniglot(N_WAY).to(DEVICE)


def ours(algo, steps, engine="custom", task_batching="auto", compile=False, **config):
    model = _model()
    cfg = mk.MAMLConfig(algo=algo, inner_steps=steps, inner_lr=INNER_LR, inner_clip=None, engine=engine, meta_lr=META_LR,
                        **config)
    learner = mk.MetaLearner(model, cfg, task_batching=task_batching, compile=compile)
    return lambda batch: learner.step(batch)


def plain_loop(algo, steps):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=META_LR)

    def step(batch):
        xs, ys, xq, yq = batch
        T = xs.shape[0]
        params = dict(model.named_parameters())
        if algo == "reptile":
            # Reptile adapts on all of a training task's examples, as ours does.
            new = {k: torch.zeros_like(v) for k, v in params.items()}
            for t in range(T):
                x_all, y_all = torch.cat([xs[t], xq[t]]), torch.cat([ys[t], yq[t]])
                fast = {k: v.detach().requires_grad_() for k, v in params.items()}
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(model, fast, (x_all,)), y_all)
                    grads = torch.autograd.grad(loss, list(fast.values()))
                    fast = {k: (v - INNER_LR * g).detach().requires_grad_() for (k, v), g in zip(fast.items(), grads)}
                for k in new:
                    new[k] += fast[k].detach() / T
            with torch.no_grad():
                for k, v in params.items():
                    v += 1.0 * (new[k] - v)
            return
        opt.zero_grad()
        for t in range(T):
            fast = params
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(model, fast, (xs[t],)), ys[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=algo == "maml")
                fast = {k: v - INNER_LR * g for (k, v), g in zip(fast.items(), grads)}
            (F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t]) / T).backward()
        opt.step()
    return step


def plain_vmap(algo, steps):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=META_LR)

    def task_loss(params, xs, ys, xq, yq):
        fast = params
        for _ in range(steps):
            grads = torch.func.grad(lambda p: F.cross_entropy(functional_call(model, p, (xs,)), ys))(fast)
            fast = {k: v - INNER_LR * grads[k] for k, v in fast.items()}
        return F.cross_entropy(functional_call(model, fast, (xq,)), yq)

    def step(batch):
        opt.zero_grad()
        params = dict(model.named_parameters())
        torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *batch).mean().backward()
        opt.step()
    return step


def with_higher(algo, steps):
    return higher_outer_step(_model(), F.cross_entropy, INNER_LR, META_LR, algo, steps)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def _peak_gb(before: float) -> float:
    """Peak memory of one step above what was held before it: GPU allocations, or process RSS."""
    if DEVICE == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9 - before
    return peak_rss_gb() - before


def _held_gb() -> float:
    if DEVICE == "cuda":
        return torch.cuda.memory_allocated() / 1e9
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6


def _measure(impls: dict, batch, rounds: int) -> tuple[dict, dict]:
    """Median seconds per outer step and peak extra memory (GB) during a step, impls in alternation."""
    for fn in impls.values():  # warm-up (allocator, oneDNN primitive caches, compilation)
        fn(batch)
    times = {k: [] for k in impls}
    peaks = {k: 0.0 for k in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            _sync()
            before = _held_gb()
            _reset_peak()
            start = time.perf_counter()
            fn(batch)
            _sync()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], _peak_gb(before))
    return {k: statistics.median(v) for k, v in times.items()}, peaks


# Memory settings timed (meta-batch 32) and measured by peak_memory.py beside the default.
MEMORY_VARIANTS = {"query1": {"query_chunk": 1}, "chunk16-query1": {"task_chunk": 16, "query_chunk": 1},
                   "chunk8-query1": {"task_chunk": 8, "query_chunk": 1},
                   "recompute-chunk16-query1": {"recompute_inner": True, "task_chunk": 16, "query_chunk": 1},
                   "recompute-chunk8-query1": {"recompute_inner": True, "task_chunk": 8, "query_chunk": 1}}


def memory_variants(algo: str) -> dict:
    """The settings that apply to `algo` (recompute_inner rebuilds MAML's second-order graph only)."""
    return {k: v for k, v in MEMORY_VARIANTS.items() if algo == "maml" or not v.get("recompute_inner")}


CASES = [(algo, T, steps) for T in (4,) for steps in (1, 5) for algo in ("maml", "fomaml", "reptile")]
CASES += [("maml", 32, 5), ("fomaml", 32, 5), ("reptile", 32, 5)]


@pytest.mark.parametrize("algo,T,steps", CASES, ids=[f"{a}-T{t}-K{k}" for a, t, k in CASES])
def test_outer_step(benchmark, algo, T, steps):
    benchmark.group = f"{algo} meta-batch {T}, {steps} inner steps"
    batch = _batch(T)
    impls = {"ours": ours(algo, steps)}
    if T == 4:
        impls["ours-torch_func"] = ours(algo, steps, engine="torch_func")
        impls["ours-no-batch"] = ours(algo, steps, task_batching="loop")
        if steps == 5 and algo != "reptile":
            impls["ours-compiled"] = ours(algo, steps, compile=True)
    elif algo != "reptile":  # the memory / batching trade-off
        for name, settings in memory_variants(algo).items():
            impls[f"ours-{name}"] = ours(algo, steps, **settings)
    impls["plain-loop"] = plain_loop(algo, steps)
    if algo != "reptile" and importlib.util.find_spec("higher") is not None:
        impls["higher"] = with_higher(algo, steps)
    if algo == "maml" and T == 4:
        impls["plain-vmap"] = plain_vmap(algo, steps)
    medians, peaks = _measure(impls, batch, rounds=3 if T == 32 else 5)
    benchmark.extra_info.update({
        "machine": machine(), "median_s": medians, "peak_extra_gb": peaks,
        "speedup_vs": {k: v / medians["ours"] for k, v in medians.items() if k != "ours"}})
    benchmark.pedantic(impls["ours"], args=(batch,), rounds=1, iterations=1)
