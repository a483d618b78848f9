"""Worker for tests/test_distributed.py and test_sharded.py, launched by torchrun: trains a preset
(--preset, default minimal) for --steps outer steps with the given overrides; optionally one rank
dies at a given step (only on the first attempt, so a torchrun restart can finish the job)."""
import argparse
import os

import torch

from meta_kernels.config import MetaLearningFullConfig
from meta_kernels.train import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--set", action="append", default=[])
parser.add_argument("--preset", default="minimal")
parser.add_argument("--die-rank", type=int, default=-1)
parser.add_argument("--die-at", type=int, default=-1)
args = parser.parse_args()

torch.set_num_threads(1)
config = MetaLearningFullConfig.preset(args.preset).with_overrides(args.set)
restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
resume = restarted and os.path.isfile(os.path.join(args.out, "checkpoints", "last.pt"))
trainer = Trainer(config, args.out, resume=resume, progress=False)
if trainer.rank == args.die_rank and not restarted:
    step = trainer.learner.step

    def step_then_die(*a, **k):
        if trainer.global_step == args.die_at:
            os._exit(3)  # a crashed rank: no clean-up, no message to its peers
        return step(*a, **k)

    trainer.learner.step = step_then_die
trainer.fit(max_steps=args.steps)  # the global step to stop at
state = trainer.model_state()  # a collective under FSDP: every rank takes part
if trainer.rank == 0:
    torch.save({k: v.detach() for k, v in state.items()}, os.path.join(args.out, "final.pt"))
