#!/usr/bin/env bash
# SLURM: one torchrun per node, rendezvous through the first node of the allocation.
#   sbatch --nodes=4 --gpus-per-node=8 python/launch_slurm.sh --set maml.meta_batch_size=128
#   PRESET=production_7b sbatch --nodes=2 --gpus-per-node=8 python/launch_slurm.sh --data-root /data/mini_imagenet
#   (production presets: FSDP-sharded ViT; `meta-kernels memory --preset production_7b --gpus 16` gives the memory per GPU)
#SBATCH --job-name=meta-kernels
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS="${GPUS_PER_NODE:-8}"
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS" --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" --rdzv_id="$SLURM_JOB_ID" \
  -m meta_kernels.cli train --preset "${PRESET:-dev}" --set run.device=cuda \
  --out "${OUT:-runs/slurm-$SLURM_JOB_ID}" --no-progress "$@"
