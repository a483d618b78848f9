"""MAML on mini-ImageNet (Ravi & Larochelle split, 84x84, Conv4 with 32 filters).

Data: $META_KERNELS_DATA/mini_imagenet (or --data-root) holding train.csv, val.csv, test.csv and
an images/ folder with the 60,000 JPEGs named in them. Decoded once into a cache.

    python python/mini_imagenet_maml.py --steps 1000 --out runs/mini_imagenet
"""
import argparse

from meta_kernels.config import MetaLearningFullConfig
from meta_kernels.train import Trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--data-root")
    parser.add_argument("--out", default="runs/mini_imagenet")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    overrides = ["episodes.dataset=mini_imagenet", "maml.inner_steps=5", "maml.inner_lr=0.01", "maml.meta_batch_size=4",
                 f"episodes.episodes_per_epoch={4 * args.steps}", "model.filters=32", f"run.device={args.device}"]
    if args.data_root:
        overrides.append(f"run.data_root={args.data_root}")
    trainer = Trainer(MetaLearningFullConfig.dev().with_overrides(overrides), args.out, overwrite=True)
    print(trainer.fit())


if __name__ == "__main__":
    main()
