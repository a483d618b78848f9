#!/usr/bin/env bash
# Checks the logic of the CUDA kernels (csrc/cuda) without a GPU: rewrites the .cu sources into
# plain C++ for the CPU emulation of emu.h (kernel launches become calls of mk_emulate_launch, the
# CUDA includes become emu.h, the op registrations are dropped, and the chunk / table / grid sizes
# shrink so that small inputs take every path: several chunks per tensor, several tables per list,
# blocks looping over chunks and tasks), builds them with the CPU kernels and ops.cpp against the
# CPU torch of $PYTHON (default .venv/bin/python), and compares every op with the CPU kernel.
# Takes about 2-3 minutes on 2 cores. Not a substitute for running on a GPU (bench/gpu_check.sh).
set -euo pipefail

start=$(date +%s)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
PYTHON="${PYTHON:-$repo/.venv/bin/python}"
torch_dir=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
abi=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')

work=$(mktemp -d "${TMPDIR:-/tmp}/mk-cuda-emu.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The emulated ops: csrc/cuda/<op>.cu, compared with csrc/cpu/<op>.cpp.
ops=(sgd_step clip_grad_norm batch_norm reptile_update max_pool2x2_relu momentum_step adam_step)

"$PYTHON" - "$repo" "$work" "${ops[@]}" <<'EOF'
import re, sys, pathlib
repo, work = map(pathlib.Path, sys.argv[1:3])
src = repo / "csrc" / "cuda"

def sub(text, old, new, count=1, regex=False):
    out, n = (re.subn(old, new, text, flags=re.S) if regex else (text.replace(old, new), text.count(old)))
    if n < count:
        sys.exit(f"cuda_emu: rewrite failed, pattern not found: {old!r}")
    return out

common = (src / "cuda_common.cuh").read_text()
for inc in ("#include <ATen/cuda/CUDAContext.h>", "#include <c10/cuda/CUDAException.h>", "#include <c10/cuda/CUDAGuard.h>"):
    common = sub(common, inc, "")
common = sub(common, '#include "../common.h"', f'#include "{repo}/csrc/common.h"')
common = sub(common, "constexpr int kMaxTensors = 64;", "constexpr int kMaxTensors = 4;")
common = sub(common, "constexpr int64_t kChunk = 4096;", "constexpr int64_t kChunk = 64;")
common = sub(common, "constexpr int64_t kMaxGrid = int64_t(1) << 20;", "constexpr int64_t kMaxGrid = 3;")
(work / "cuda_common.cuh").write_text(common)
stateful = sub((src / "stateful.cuh").read_text(), "constexpr int kStatefulMaxTensors = 32;", "constexpr int kStatefulMaxTensors = 3;")
(work / "stateful.cuh").write_text(stateful)

for name in sys.argv[3:]:
    text = (src / f"{name}.cu").read_text()
    text = text.replace("#include <math_constants.h>", "")
    text = sub(text, r"(\b\w+_kernel<[\w, ]+>)<<<(.+?)>>>\(", r"mk_emulate_launch(\1, \2, ", regex=True)
    text = sub(text, r"TORCH_LIBRARY_IMPL\(meta_kernels, CUDA, m\) \{.*?\}\n", "", regex=True)
    if name == "clip_grad_norm":
        text = sub(text, "constexpr int64_t kMaxGridY = 65535;", "constexpr int64_t kMaxGridY = 2;")
    if name == "batch_norm":
        text = sub(text, "if (geo.small())", "if (geo.small() && !mk_emu::force_large_index)", count=2)
    if "<<<" in text or "TORCH_LIBRARY_IMPL" in text:
        sys.exit(f"cuda_emu: {name}.cu still has CUDA-only syntax after the rewrite")
    (work / f"{name}.cpp").write_text(text)
EOF

echo "cuda_emu: building (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), ${MAX_JOBS:-2} jobs)"
flags=(-std=c++20 -O1 -g0 -pthread -fopenmp -D_GLIBCXX_USE_CXX11_ABI="$abi"
  -I"$here" -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include"
  -DMK_EMU_SGD="\"$work/sgd_step.cpp\"" -DMK_EMU_CLIP="\"$work/clip_grad_norm.cpp\""
  -DMK_EMU_BN="\"$work/batch_norm.cpp\"" -DMK_EMU_REPTILE="\"$work/reptile_update.cpp\"" -DMK_EMU_POOL="\"$work/max_pool2x2_relu.cpp\""
  -DMK_EMU_MOMENTUM="\"$work/momentum_step.cpp\"" -DMK_EMU_ADAM="\"$work/adam_step.cpp\"")
# One object per source, MAX_JOBS at a time (each source spends most of its time in the torch
# headers), the harness (the largest) first; then one link. The CPU kernels are those of the
# emulated ops only: the others have no CUDA kernel to compare with.
sources=("$here/harness.cpp" "$repo/csrc/ops.cpp")
for op in "${ops[@]}"; do sources+=("$repo/csrc/cpu/$op.cpp"); done
mkdir "$work/obj"
objects=()
running=0
for src in "${sources[@]}"; do
  obj="$work/obj/$(basename "$(dirname "$src")")_$(basename "${src%.cpp}").o"
  objects+=("$obj")
  if [ "$running" -ge "${MAX_JOBS:-2}" ]; then wait -n; running=$((running - 1)); fi
  { g++ "${flags[@]}" -c "$src" -o "$obj" || touch "$work/failed"; } &
  running=$((running + 1))
done
wait
[ ! -e "$work/failed" ] || { echo "cuda_emu: FAILED to build" >&2; exit 1; }
g++ -pthread -fopenmp "${objects[@]}" \
  -L"$torch_dir/lib" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib" \
  -o "$work/cuda_emu"
OMP_NUM_THREADS=1 "$work/cuda_emu"
echo "cuda_emu: OK in $(( $(date +%s) - start )) s"
