#!/usr/bin/env bash
# C++ build check: configures the CMake build of the op library (CMakeLists.txt) against the torch
# of $PYTHON (default .venv/bin/python: the CPU torch) in a temporary build folder, builds it and the
# C++ op test (tests/cpp) with 2 jobs, and runs the test through CTest. CUDA stays off here.
set -euo pipefail

start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON="${PYTHON:-$repo/.venv/bin/python}"
jobs="${MAX_JOBS:-2}"

prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
echo "build_cmake: $("$PYTHON" -c 'import torch; print("torch", torch.__version__)') at $prefix; $(cmake --version | head -n 1)"

build=$(mktemp -d "${TMPDIR:-/tmp}/mk-cmake-build.XXXXXX")
trap 'rm -rf "$build"' EXIT
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

cmake -S "$repo" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" \
  -DMETA_KERNELS_CUDA=OFF \
  -DMETA_KERNELS_BUILD_TESTS=ON
cmake --build "$build" --parallel "$jobs"
(cd "$build" && ctest --output-on-failure --verbose)
echo "build_cmake: OK in $(( $(date +%s) - start )) s"
