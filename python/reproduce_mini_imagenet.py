"""Reproduce a published mini_imagenet result (MAML / FOMAML, Reptile, MAML++): the papers'
hyperparameters as named recipes (meta_kernels/recipes.py), trained with Trainer and tested
with the paper's protocol (episodes, query size, test-time inner steps) into OUT/test/eval.json.
Needs a GPU and the full data; not reproduced in this repository's CPU environment.

    python python/reproduce_mini_imagenet.py --recipe maml_mini_imagenet_5w1s --data-root DATA/mini_imagenet --dry-run
"""
import sys

from meta_kernels.recipes import main

if __name__ == "__main__":
    sys.exit(main("mini_imagenet"))
