"""MAML / FOMAML / Reptile on Omniglot with the runner: checkpoints, metrics, plots, test eval.

Data: point --data-root (or $META_KERNELS_DATA/omniglot) at a folder with the official zips
(images_background.zip + images_evaluation.zip, variant 'full'), or the two
images_background_small1/2.zip files (variant 'small').

    python python/omniglot_maml.py --algo maml --steps 500 --out runs/omniglot
"""
import argparse

from meta_kernels.config import MetaLearningFullConfig
from meta_kernels.train import Trainer, evaluate_checkpoint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", default="maml", choices=("maml", "fomaml", "reptile"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--variant", default="small", choices=("small", "full"))
    parser.add_argument("--data-root")
    parser.add_argument("--out", default="runs/omniglot")
    parser.add_argument("--test-episodes", type=int, default=600)
    args = parser.parse_args()
    overrides = [f"maml.algo={args.algo}", "maml.inner_steps=1", "maml.meta_batch_size=8", "maml.inner_clip=null",
                 "episodes.q_query=5", f"episodes.episodes_per_epoch={8 * args.steps}", "model.filters=32",
                 f"run.omniglot_variant={args.variant}", f"run.val_every={max(1, args.steps // 5)}",
                 f"checkpoint.every_steps={max(1, args.steps // 5)}"]
    if args.algo == "reptile":
        overrides += ["maml.inner_steps=5", "maml.inner_lr=0.1", "maml.reptile_epsilon=0.5",
                      f"maml.reptile_decay_steps={args.steps}"]
    if args.algo != "maml":  # per-step BatchNorm (dev's mode) trains only under MAML's second order
        overrides.append("mamlpp.bn_mode=transductive")
    if args.data_root:
        overrides.append(f"run.data_root={args.data_root}")
    config = MetaLearningFullConfig.dev().with_overrides(overrides)
    trainer = Trainer(config, args.out, overwrite=True)  # a rerun replaces the previous one
    print(trainer.fit())
    result = evaluate_checkpoint(trainer.ckpt_dir / "best.pt", f"{args.out}/test", episodes=args.test_episodes)
    print(f"test accuracy {result['accuracy']:.3f} +- {result['ci95']:.3f}, adaptation curve {result['curve_accuracy']}")


if __name__ == "__main__":
    main()
