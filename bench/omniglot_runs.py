"""The real-data training runs of meta_kernels.omniglot_suites, at the length recorded in
bench/RESULTS.md:

    python bench/omniglot_runs.py algorithms --steps 600   # MAML, FOMAML, Reptile
    python bench/omniglot_runs.py ablation --steps 600 --epochs 4   # MAML, each MAML++ switch alone, all of MAML++

Writes bench/results/<suite>.json and <suite>.png and prints a markdown table."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from meta_kernels.omniglot_suites import ABLATION_BASE, SUITES, run  # noqa: E402
from _common import machine, plot_curves  # noqa: E402


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
    (out / f"{args.suite}.json").write_text(json.dumps({"machine": machine(), "steps": args.steps, "epochs": args.epochs,
                                                      "runs": rows}, indent=2))
    print("\n| run | steps | pre-adapt acc | post-adapt acc (95% CI) | step-1 acc | AUAC | s/step | NaN steps | LSLR range |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        t = r["test"]
        curve = t["curve_accuracy"]
        lslr = "" if r["lslr_min"] is None else f"[{r['lslr_min']:.3g}, {r['lslr_max']:.3g}]"
        print(f"| {r['name']} | {r['steps']} | {t['pre_adapt_acc']:.3f} | {t['accuracy']:.3f} +- {t['ci95']:.3f} | "
              f"{curve[1]:.3f} | {t['auac']:.3f} | {r['s_per_step']} | {r['nan_steps']} | {lslr} |")
    plot_curves({r["name"]: (range(len(r["test"]["curve_accuracy"])), r["test"]["curve_accuracy"]) for r in rows},
                out / f"{args.suite}.png", "inner step", "test query accuracy (5-way 1-shot)",
                f"Omniglot small, held-out characters: {args.suite}", ylim=(0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
