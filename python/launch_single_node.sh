#!/usr/bin/env bash
# Meta-training on every GPU of one machine (or N CPU processes with gloo): the meta-batch is
# sharded across ranks and the meta-gradients are summed by one all-reduce per outer step.
# --max-restarts lets torchrun restart all ranks after a failure; the runner then continues
# from the last checkpoint in --out.
#   NPROC=8 DEVICE=cuda bash python/launch_single_node.sh --set maml.meta_batch_size=32
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
DEVICE="${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
# One device per rank: LOCAL_RANK picks it (torch.cuda.set_device in meta_kernels.distributed).
exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  -m meta_kernels.cli train --preset "${PRESET:-dev}" --set "run.device=$DEVICE" \
  --out "${OUT:-runs/multi}" --no-progress "$@"
