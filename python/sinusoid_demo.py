"""Sinusoid regression MAML (Finn et al. 2017), the same job as `meta-kernels demo`.

    python python/sinusoid_demo.py --steps 4000 --out runs/demo
"""
import argparse

from meta_kernels.demo import run_demo


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()
    summary = run_demo(args.out, outer_steps=args.steps)
    print("held-out MSE after 0..10 inner steps:", [round(v, 3) for v in summary["heldout_mse_by_inner_step_after_meta_training"]])


if __name__ == "__main__":
    main()
