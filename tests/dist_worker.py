"""Worker for tests/test_distributed.py and test_sharded.py, launched by torchrun: trains a preset
(--preset, default minimal) for --steps outer steps with the given overrides; optionally one rank
dies at a given step (only on the first attempt, so a torchrun restart can finish the job).
--resume continues the run in --out (on any number of ranks); --record-shards writes, at every
save, the numel of the optimiser state each rank holds (and checks that nothing gathers it)."""
import argparse
import json
import os
import sys

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
parser.add_argument("--resume", action="store_true")
parser.add_argument("--record-shards", action="store_true")
args = parser.parse_args()

torch.set_num_threads(1)
config = MetaLearningFullConfig.preset(args.preset).with_overrides(args.set)
restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
ckpts = os.path.join(args.out, "checkpoints")
resume = args.resume or (restarted and os.path.isdir(ckpts)
                          and any(n == "last.pt" or n.startswith("step-") for n in os.listdir(ckpts)))
trainer = Trainer(config, args.out, resume=resume, progress=False)
if args.record_shards:
    learner, records = trainer.learner, []
    sharded_state_dict = learner.sharded_state_dict

    def recording():
        state = sharded_state_dict()
        tensors = [v for s in state["optimizer"]["state"].values() for v in s.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0]
        records.append({"local": sum(t.to_local().numel() for t in tensors), "full": sum(t.numel() for t in tensors)})
        with open(os.path.join(args.out, f"shards-rank{trainer.rank}.json"), "w") as f:
            json.dump(records, f)
        return state

    def refuse(*a, **k):
        raise AssertionError("a full (gathered) state was asked for during a sharded save")

    learner.sharded_state_dict = recording
    learner.state_dict = learner.model_state_dict = refuse
if trainer.rank == args.die_rank and not restarted:
    step = trainer.learner.step

    def step_then_die(*a, **k):
        if trainer.global_step == args.die_at:
            os._exit(3)  # a crashed rank: no clean-up, no message to its peers
        return step(*a, **k)

    trainer.learner.step = step_then_die
trainer.fit(max_steps=args.steps)  # the global step to stop at
if args.record_shards:
    del learner.state_dict, learner.model_state_dict
state = trainer.model_state()  # a collective under FSDP: every rank takes part
if trainer.rank == 0:
    torch.save({k: v.detach() for k, v in state.items()}, os.path.join(args.out, "final.pt"))
print(f"rank {trainer.rank}: finished", file=sys.stderr, flush=True)  # an abort after this is teardown
