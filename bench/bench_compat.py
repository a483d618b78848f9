"""The peers' own example loops on their own example models, run on the original library, with the
import swapped to meta_kernels.compat, and in the README's batched form (its diff applied with
`patch` to the loop: tests/peer_examples), each configuration in a fresh process, alternating.

Cases (random Omniglot-shaped data, tests/peer_examples):
  l2l_fc      learn2learn's examples/vision/maml_omniglot.py on its OmniglotFC: MAML lr 0.5, 1 step,
              5-way 1-shot (5 + 5 samples), 32 tasks + 32 validation tasks per iteration
  higher_net  higher's examples/maml-omniglot.py `train` on its network (BatchNorm with running
              statistics, momentum 1): SGD 0.1, 5 steps, 5-way 5-shot 15-query, 32 tasks
  l2l_cnn     learn2learn's loop on its OmniglotCNN (running statistics), 16 tasks + 16 validation
  l2l_mlp     learn2learn's loop on a plain MLP (784-256-128-5, no normalisation), 32 + 32 tasks
  higher_mlp  higher's loop on that MLP (5 SGD steps on 25 support samples, 32 tasks)
  conv4_l2l / conv4_higher   the same two loops on a user's nn.Sequential Conv4 (padding 1,
              batch statistics only: the model of the earlier rows of bench/RESULTS.md)
  l2l_row_lstm, l2l_row_transformer, l2l_resnet12, l2l_ln_mlp   learn2learn's loop on other models a
              user brings (meta_kernels.models.plain): an LSTM and a 2-layer Transformer encoder reading
              the image as a sequence of its 28 rows (the Transformer under the math attention backend: the
              fused CPU kernel has no double backward), a ResNet-12 (widths 16-128, 4 tasks), a
              784-256-5 MLP with LayerNorm: "never slower than the original, on any model"
Variants: original (learn2learn 0.2 from its sdist, the real higher), compat (import swapped),
batched (the README's diff), and for higher_net batched-chunk8 / -chunk4 / -chunk2 (the README's
low-memory line: 8, 4 or 2 tasks per innerloop_ctx).

    python bench/bench_compat.py                      # every case, 3 rounds, table + JSON + plot
    python bench/bench_compat.py --cases l2l_fc --rounds 5
    python bench/bench_compat.py --swap-only --steps 10 # original vs compat alternating in one process
    python bench/bench_compat.py --thread-ab --steps 10 # compat forced to all threads / to one
    python bench/bench_compat.py --factored-ab --steps 10 # compat forced to its own layers / factored
    pytest bench/bench_compat.py                      # pytest-benchmark: one quick in-process round

Each row: median seconds per iteration (the example's outer step) over the rounds, each round the
median of `--steps` timed iterations after one warm-up in a fresh process; peak RSS of the process
and its growth over the RSS before the first iteration."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the example copies and their data

CASES = {
    "l2l_fc": ("l2l", "omniglot_fc", 32),
    "higher_net": ("higher", "higher_net", 32),
    "l2l_cnn": ("l2l", "omniglot_cnn", 16),
    "l2l_mlp": ("l2l", "mlp", 32),
    "higher_mlp": ("higher", "mlp", 32),
    "conv4_l2l": ("l2l", "conv4", 32),
    "conv4_higher": ("higher", "conv4", 32),
    "l2l_row_lstm": ("l2l", "row_lstm", 16),
    "l2l_row_transformer": ("l2l", "row_transformer", 16),
    "l2l_resnet12": ("l2l", "resnet12", 4),
    "l2l_ln_mlp": ("l2l", "ln_mlp", 32),
}
VARIANTS = ("original", "compat", "batched")
EXTRA_VARIANTS = {"higher_net": ("batched-chunk8", "batched-chunk4", "batched-chunk2")}


def _user_models() -> dict:
    from torch import nn
    from meta_kernels.models.plain import LSTMClassifier, ResNet12, TransformerClassifier

    class Rows(nn.Module):
        """An image [N, 1, 28, 28] read as a sequence of its 28 rows."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.flatten(1, 2))

    return {"row_lstm": lambda: Rows(LSTMClassifier(28, 5, hidden=64)),
            "row_transformer": lambda: Rows(TransformerClassifier(28, 5, dim=32)),
            "resnet12": lambda: ResNet12(5, widths=(16, 32, 64, 128), in_channels=1),
            "ln_mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.LayerNorm(256), nn.ReLU(),
                                            nn.Linear(256, 5))}


def make_step(case: str, variant: str, device: str = "cpu"):
    """() -> one iteration of the case's example loop in that variant."""
    import torch
    import peer_examples as pe
    from meta_kernels.models import peers, sequential_conv4
    loop, model_name, tasks = CASES[case]
    make = {"conv4": sequential_conv4, **peers.PEER_MODELS, **_user_models()}[model_name]
    names = {}
    if variant == "original":
        if loop == "l2l":
            from meta_kernels.compat import original_learn2learn
            names["l2l"] = original_learn2learn.load()
        else:
            import higher
            names["higher"] = higher
    source = pe.patched_source(loop) if variant.startswith("batched") else None
    if variant.startswith("batched-chunk"):  # the README's low-memory form: k tasks per innerloop_ctx
        k = int(variant.removeprefix("batched-chunk"))
        source = source.replace("for i in [slice(None)]:", f"for i in higher.task_chunks(task_num, {k}):").replace(
            "tasks=task_num", f"tasks={k}")
    module = pe.load(loop, source=source, **names)
    torch.manual_seed(0)
    model = make().to(device)
    if loop == "l2l":
        tasksets = pe.random_tasksets()
        step = lambda: module.main(model, tasksets, meta_batch_size=tasks, device=torch.device(device))
        if model_name == "row_transformer":  # second order through attention: the math backend, as users must
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def under_math():
                with sdpa_kernel(SDPBackend.MATH):
                    return step()
            return under_math
        return step
    db, opt = pe.RandomNShot(batchsz=tasks, device=device), torch.optim.Adam(model.parameters(), 1e-3)
    return lambda: module.train(db, model, device, opt, 0, [])


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6


def child(case: str, variant: str, steps: int, device: str) -> dict:
    import torch
    step = make_step(case, variant, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    before = _rss_gb()
    step()  # warm-up: the one-time choices (measured forward path) and allocations
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    row = {"s_per_step": statistics.median(times), "peak_rss_gb": peak, "rss_growth_gb": peak - before}
    if device.startswith("cuda"):
        row["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return row


def swap_child(case: str, steps: int, device: str) -> dict:
    """The original and the import-swapped loop in one process, iterations alternating: the VM's
    noise (the original's share of Python moves with it) hits both alike. No batched form here: it
    turns on the process-wide reuse of freed memory, which would change the original's malloc too."""
    from _common import interleaved_medians
    from meta_kernels.compat import _common
    steps_of = {v: make_step(case, v, device) for v in ("original", "compat")}
    row = interleaved_medians(steps_of, rounds=steps, inner=1, warmup=1)
    return {**row, "plans": [runner.plan for runner in _common._RUNNERS.values()]}


# In-process A/Bs of the import-swapped loop, the runner's choice forced each way (--thread-ab, --factored-ab).
AB = {"threads": ("all threads", "one thread"), "factored": ("plain Linear steps", "factored Linear steps")}


def ab_child(case: str, steps: int, device: str, kind: str) -> dict:
    """The import-swapped loop with its runner's choice forced to A and to B (kind "threads": all
    threads / one, the path as chosen; "factored": the model's own layers / factored Linear steps,
    the threads as chosen), iterations alternating in one process beside the original: what the
    runner's choice is worth on the user's loop (its own measurement times a single MAML step)."""
    from _common import interleaved_medians
    from meta_kernels.compat import _common
    original, compat = make_step(case, "original", device), make_step(case, "compat", device)
    compat()  # the runner measures its candidates here
    (runner,) = _common._RUNNERS.values()
    plan = runner.plan

    def forced(b: bool):
        def step():
            for key, (path, threads) in list(runner.choice.items()):
                runner.choice[key] = ((path, 1 if b else None) if kind == "threads" else
                                      ("factored" if b else "plain", threads))
            compat()
        return step

    row = interleaved_medians({"original": original, "compat": forced(False), "compat_b": forced(True)},
                              rounds=steps, inner=1, warmup=1)
    return {**row, "plans": [plan]}


def run_swap(cases, rounds: int, steps: int, device: str, ab: str | None = None) -> dict:
    """--swap-only: per case, `rounds` fresh processes each timing original and compat alternately
    (ab: compat forced both ways of an AB choice, --thread-ab / --factored-ab)."""
    results = {}
    for case in cases:
        ratios, medians = [], []
        for r in range(rounds):
            child_args = ["--ab-child", ab, case] if ab else ["--swap-child", case]
            out = subprocess.run([sys.executable, __file__, *child_args, "--steps", str(steps), "--device", device],
                                 capture_output=True, text=True, cwd=HERE)
            if out.returncode != 0:
                print(f"{case}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            medians.append(row)
            ratios.append(row["original"] / row["compat"])
            print(f"  {case:13s} round {r + 1}: compat's plan: {'; '.join(row['plans'])}", file=sys.stderr)
            b = f", {AB[ab][1]} {row['compat_b']:.3f}" if ab else ""
            print(f"  {case:13s} round {r + 1}: original {row['original']:.3f}, compat {row['compat']:.3f}{b} s/step "
                  f"({ratios[-1]:.2f}x)", file=sys.stderr, flush=True)
        if ratios:
            results[case] = {"original_s": statistics.median(m["original"] for m in medians),
                             "compat_s": statistics.median(m["compat"] for m in medians),
                             "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                             "ratio_max": max(ratios), "rounds": len(ratios)}
            if ab:
                gains = [m["compat"] / m["compat_b"] for m in medians]
                results[case].update(compat_b_s=statistics.median(m["compat_b"] for m in medians),
                                     b_gain_median=statistics.median(gains), b_gains=gains,
                                     b_x_original=[m["original"] / m["compat_b"] for m in medians])
    return results


def run(cases, rounds: int, steps: int, device: str = "cpu", only: set[str] | None = None) -> dict:
    results = {}
    for case in cases:
        variants = [v for v in VARIANTS + EXTRA_VARIANTS.get(case, ()) if only is None or v in only]
        samples = {v: [] for v in variants}
        for r in range(rounds):
            for variant in variants:
                out = subprocess.run([sys.executable, __file__, "--child", case, variant, "--steps", str(steps),
                                      "--device", device], capture_output=True, text=True, cwd=HERE)
                if out.returncode != 0:
                    print(f"{case} {variant}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                samples[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                row = samples[variant][-1]
                print(f"  {case:13s} {variant:15s} round {r + 1}: {row['s_per_step']:.3f} s/step, "
                      f"peak RSS {row['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
        results[case] = {v: {k: statistics.median(s[k] for s in rows) for k in rows[0]} | {"rounds": len(rows)}
                         for v, rows in samples.items() if rows}
    return results


def markdown(results: dict) -> str:
    lines = ["| case | variant | s/step | x original | peak RSS GB | RSS growth GB |", "|---|---|---:|---:|---:|---:|"]
    for case, rows in results.items():
        base = rows.get("original", {}).get("s_per_step")
        for variant, row in rows.items():
            ratio = f"{base / row['s_per_step']:.2f}x" if base else "-"
            lines.append(f"| {case} | {variant} | {row['s_per_step']:.3f} | {ratio} | {row['peak_rss_gb']:.2f} | "
                         f"{row['rss_growth_gb']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, ratios = [], []
    for case, rows in results.items():
        base = rows.get("original", {}).get("s_per_step")
        for variant, row in rows.items():
            if base and variant != "original":
                labels.append(f"{case}: {variant}")
                ratios.append(base / row["s_per_step"])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.5))
    ax.barh(range(len(labels)), ratios, color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("speed-up over the original library (its time / ours)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def test_compat_examples(benchmark):
    """One in-process round of the l2l_fc case (quick; bench_compat.py's main is the measurement)."""
    from _common import interleaved_medians, machine
    benchmark.group = "compat examples"
    steps = {v: make_step("l2l_fc", v) for v in VARIANTS}
    medians = interleaved_medians(steps, rounds=3, inner=1, warmup=1)
    benchmark.extra_info.update({"machine": machine(), "median_s": medians,
                                 "speedup_vs_original": {k: medians["original"] / v for k, v in medians.items()}})
    benchmark.pedantic(steps["batched"], rounds=1, iterations=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--swap-only", action="store_true",
                        help="original vs import swapped only, alternating iterations inside each process")
    parser.add_argument("--thread-ab", action="store_true",
                        help="as --swap-only, the compat loop forced to all threads and to one (the runner's choice)")
    parser.add_argument("--factored-ab", action="store_true",
                        help="as --swap-only, the compat loop forced to its own layers and to factored Linear steps")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--swap-child", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("--ab-child", nargs=2, metavar=("KIND", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "compat.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.device)))
        return 0
    if args.swap_child:
        print(json.dumps(swap_child(args.swap_child, args.steps, args.device)))
        return 0
    if args.ab_child:
        kind, case = args.ab_child
        print(json.dumps(ab_child(case, args.steps, args.device, kind)))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    from _common import machine
    ab = "threads" if args.thread_ab else "factored" if args.factored_ab else None
    if args.swap_only or ab:
        results = run_swap(cases, args.rounds, args.steps, args.device, ab)
        if ab:
            a_name, b_name = AB[ab]
            print(f"| case | original s/step | compat, {a_name} | compat, {b_name} | {b_name}: gain per process | "
                  f"{b_name}: x original per process |\n|---|---:|---:|---:|---|---|")
            for case, r in results.items():
                print(f"| {case} | {r['original_s']:.3f} | {r['compat_s']:.3f} | {r['compat_b_s']:.3f} | "
                      f"{', '.join(f'{g:.2f}x' for g in r['b_gains'])} | "
                      f"{', '.join(f'{g:.2f}x' for g in r['b_x_original'])} |")
        else:
            print("| case | original s/step | compat s/step | x original (median of rounds) | min - max |\n"
                  "|---|---:|---:|---:|---|")
            for case, r in results.items():
                print(f"| {case} | {r['original_s']:.3f} | {r['compat_s']:.3f} | {r['ratio_median']:.2f}x | "
                      f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x |")
        out = Path(args.out).with_name(Path(args.out).stem + (f"_{ab}.json" if ab else "_swap.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "device": args.device, "results": results}, indent=1))
        print(f"written: {out}", file=sys.stderr)
        return 0
    only = None if args.variants is None else {v.strip() for v in args.variants.split(",") if v.strip()}
    results = run(cases, args.rounds, args.steps, args.device, only)
    table = markdown(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "device": args.device, "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"written: {out}, {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
