#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 (its image has torch, triton, pytest, pytest-benchmark; no
# network): build the extension with the CUDA kernels, run the CUDA and Triton tests, the op,
# meta-step and sharded-ViT benchmarks on the GPU, and the GPU bars (launch count, bandwidth,
# batch norm). Writes everything under $OUT (or bench/results) and prints a short table. Sized to
# finish in ~9 min, the sharded step last and capped at 90 s.
#   device run:  bash bench/gpu_check.sh        (timeout_s 600; each step has its own cap)
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out="${OUT:-$repo/bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
t0=$(date +%s)
{
  echo "== $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader) | commit $(git rev-parse --short HEAD 2>/dev/null) | $(date -u +%F)"
  echo "== build (CUDA kernels, sm_90)"
  META_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$py" -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
  "$py" -c "import meta_kernels as mk, json; print(json.dumps(mk.backend_info()))"
  echo "== CUDA and Triton tests ($(( $(date +%s) - t0 )) s)"
  "$py" -m pytest -q -x -p no:cacheprovider tests/ops -k "cuda" || status=1
  "$py" -m pytest -q -p no:cacheprovider tests/test_meta_gradients.py -k "engines_agree or batch_norm_matches" || status=1
  echo "== GPU bars ($(( $(date +%s) - t0 )) s)"
  (cd bench && "$py" gpu_metrics.py) || status=1
  echo "== op benchmarks ($(( $(date +%s) - t0 )) s)"
  (cd bench && timeout 150 "$py" -m pytest -q -p no:cacheprovider bench_ops.py --benchmark-json="$out/ops_gpu.json" >/dev/null) \
    && "$py" bench/summarize.py "$out/ops_gpu.json"
  echo "== meta-step benchmark, meta-batch 32 ($(( $(date +%s) - t0 )) s)"
  (cd bench && timeout 150 "$py" -m pytest -q -p no:cacheprovider bench_meta_step.py -k "T32" \
    --benchmark-json="$out/meta_step_gpu.json" >/dev/null) && "$py" bench/summarize.py "$out/meta_step_gpu.json"
  echo "== users' own models on the engine: Sequential Conv4, ResNet-12, MLP ($(( $(date +%s) - t0 )) s)"
  (cd bench && timeout 180 "$py" -m pytest -q -p no:cacheprovider bench_user_models.py \
    --benchmark-json="$out/user_models_gpu.json" >/dev/null) && "$py" bench/summarize.py "$out/user_models_gpu.json"
  "$py" -m pytest -q -p no:cacheprovider tests/test_batching.py tests/test_user_models.py -x || status=1
  echo "== the peers' example loops on their models: original, import swapped, batched ($(( $(date +%s) - t0 )) s)"
  # The original learn2learn comes from its sdist in $META_KERNELS_CACHE (carry .cache: the device is offline).
  (cd bench && META_KERNELS_CACHE="${META_KERNELS_CACHE:-$repo/.cache}" timeout 150 "$py" bench_compat.py --device cuda \
    --cases l2l_fc,l2l_cnn,higher_net --rounds 1 --steps 2 --variants original,compat,batched,batched-chunk8 --out "$out/compat_gpu.json")
  echo "== sharded FOMAML, production_1b ViT on 1 GPU ($(( $(date +%s) - t0 )) s)"
  timeout 90 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 bench/bench_sharded_gpu.py --steps 3 \
    || status=1
  echo "== done in $(( $(date +%s) - t0 )) s, status $status"
  exit "$status"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
