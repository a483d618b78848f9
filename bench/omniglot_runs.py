"""Real-data training runs on the Omniglot "background small" sets (class-disjoint character
split: train / val / test), used for gate (b) and the MAML++ ablation.

    python bench/omniglot_runs.py gate_b   --steps 600   # MAML, FOMAML, Reptile
    python bench/omniglot_runs.py ablation --steps 600 --epochs 4   # MAML, each MAML++ switch alone, all of MAML++

Each run trains for the same number of outer steps, then evaluates test episodes: pre/post-adapt
accuracy (95% CI), the adaptation curve, AUAC, seconds per outer step. Writes
bench/results/<suite>.json and <suite>.png and prints a markdown table."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


from meta_kernels.config import MetaLearningFullConfig
from meta_kernels.train import Trainer

BASE = ["episodes.n_way=5", "episodes.k_shot=1", "episodes.q_query=5", "run.omniglot_variant=small",
        "model.filters=32", "maml.meta_batch_size=8", "maml.engine=custom", "maml.inner_clip=null",
        "maml.meta_lr=0.002", "mamlpp.bn_mode=transductive"]

SUITES = {
    "gate_b": {
        "MAML": ["maml.algo=maml", "maml.inner_steps=1", "maml.inner_lr=0.4"],
        # First-order methods need several inner steps: with one large step the ignored curvature
        # term dominates (FOMAML at 1 step, lr 0.4 reached 48% in this budget).
        "FOMAML": ["maml.algo=fomaml", "maml.inner_steps=5", "maml.inner_lr=0.1"],
        "Reptile": ["maml.algo=reptile", "maml.inner_steps=5", "maml.inner_lr=0.1", "maml.reptile_epsilon=1.0"],
    },
    "ablation": {
        "MAML": [],
        "+LSLR": ["mamlpp.use_lslr=true"],
        "+MSL": ["mamlpp.use_msl=true", "mamlpp.msl_decay_epochs=1"],
        "+annealing": ["mamlpp.use_annealing=true", "mamlpp.annealing_start_epoch=1"],
        "+per-step BN": ["mamlpp.bn_mode=per_step"],
        "MAML++ (all)": ["mamlpp.use_lslr=true", "mamlpp.use_msl=true", "mamlpp.msl_decay_epochs=1",
                         "mamlpp.use_annealing=true", "mamlpp.annealing_start_epoch=1", "mamlpp.bn_mode=per_step",
                         "mamlpp.cosine_meta_lr=true"],
    },
}
ABLATION_BASE = ["maml.algo=maml", "maml.inner_steps=3", "maml.inner_lr=0.4"]


def run(name: str, overrides: list[str], steps: int, out: Path, test_episodes: int, epochs: int = 2) -> dict:
    B = 8
    decay = [f"maml.reptile_decay_steps={steps}"] if "maml.algo=reptile" in overrides else []  # eps: 1 -> 0
    config = MetaLearningFullConfig.dev().with_overrides(
        BASE + overrides + decay + [f"episodes.episodes_per_epoch={B * steps // epochs}", f"run.epochs={epochs}",
                            f"run.val_every={max(1, steps // 4)}", "run.val_episodes=100",
                            f"checkpoint.every_steps={steps}"])
    trainer = Trainer(config, out / name.replace(" ", "_").replace("+", "plus_").replace("(", "").replace(")", ""),
                      progress=False)
    start = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - start
    from meta_kernels.data import EpisodeSampler
    from meta_kernels.train import SPLIT_SEEDS, load_split
    test = EpisodeSampler(load_split(config, "test"), config.episodes, seed=config.run.seed + SPLIT_SEEDS["test"])
    result = trainer.evaluate("test", test_episodes, sampler=test)
    lslr = trainer.learner.lslr
    nan = [h for h in trainer.history if h["split"] == "train" and not math.isfinite(h[trainer.loss_key])]
    return {"name": name, "overrides": overrides, "steps": summary["global_step"], "train_seconds": round(seconds, 1),
            "s_per_step": round(seconds / max(summary["global_step"], 1), 3), "test": result,
            "nan_steps": len(nan), "lslr_min": None if lslr is None else float(lslr.detach().min()),
            "lslr_max": None if lslr is None else float(lslr.detach().max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=list(SUITES))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2,
                        help="the steps are split into this many epochs; annealing and the MSL schedule end after the first")
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args(argv)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for name, overrides in SUITES[args.suite].items():
        if args.only and name not in args.only:
            continue
        extra = ABLATION_BASE if args.suite == "ablation" else []
        rows.append(run(name, extra + overrides, args.steps, out / args.suite, args.test_episodes, args.epochs))
        t = rows[-1]["test"]
        print(f"{name}: pre {t['pre_adapt_acc']:.3f} post {t['accuracy']:.3f} +- {t['ci95']:.3f} auac {t['auac']:.3f} "
              f"({rows[-1]['s_per_step']} s/step)", flush=True)
    (out / f"{args.suite}.json").write_text(json.dumps({"machine": _machine(), "steps": args.steps, "epochs": args.epochs,
                                                      "runs": rows}, indent=2))
    print("\n| run | steps | pre-adapt acc | post-adapt acc (95% CI) | step-1 acc | AUAC | s/step | NaN steps | LSLR range |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        t = r["test"]
        curve = t["curve_accuracy"]
        lslr = "" if r["lslr_min"] is None else f"[{r['lslr_min']:.3g}, {r['lslr_max']:.3g}]"
        print(f"| {r['name']} | {r['steps']} | {t['pre_adapt_acc']:.3f} | {t['accuracy']:.3f} +- {t['ci95']:.3f} | "
              f"{curve[1]:.3f} | {t['auac']:.3f} | {r['s_per_step']} | {r['nan_steps']} | {lslr} |")
    _plot(rows, out / f"{args.suite}.png", args.suite)
    return 0


def _machine() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine
    return machine()


def _plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        curve = r["test"]["curve_accuracy"]
        ax.plot(range(len(curve)), curve, "o-", label=r["name"])
    ax.set_xlabel("inner step")
    ax.set_ylabel("test query accuracy (5-way 1-shot)")
    ax.set_title(f"Omniglot small, held-out characters: {title}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
