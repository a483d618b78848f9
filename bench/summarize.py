"""Turns a pytest-benchmark JSON from bench_ops.py / bench_meta_step.py into a markdown table of
medians and speed-up ratios (and a bar chart PNG next to the JSON).

    python bench/summarize.py bench/results/ops.json"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(data: dict):
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "median_s" not in info:
            continue
        ours = next(k for k in info["median_s"] if k not in info["speedup_vs"])
        for other, ratio in info["speedup_vs"].items():
            yield bench["group"], ours, info["median_s"][ours], other, info["median_s"][other], ratio


def markdown(data: dict) -> str:
    lines = ["| case | ours | ours ms | baseline | baseline ms | speed-up |", "|---|---|---:|---|---:|---:|"]
    for group, ours, t_ours, other, t_other, ratio in rows(data):
        lines.append(f"| {group} | {ours} | {t_ours * 1e3:.3f} | {other} | {t_other * 1e3:.3f} | {ratio:.2f}x |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = list(rows(data))
    if not entries:
        return
    labels = [f"{g}\nvs {o}" for g, _, _, o, _, _ in entries]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(entries) + 1.5))
    ax.barh(range(len(entries)), [r for *_, r in entries], color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(entries)), labels, fontsize=7)
    ax.set_xlabel("speed-up of ours (baseline time / our time)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    path = Path(argv[1])
    data = json.loads(path.read_text())
    machine = next((b["extra_info"]["machine"] for b in data["benchmarks"] if "machine" in b.get("extra_info", {})), {})
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(markdown(data))
    plot(data, path.with_suffix(".png"))


if __name__ == "__main__":
    main(sys.argv)
