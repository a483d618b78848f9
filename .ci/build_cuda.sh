#!/usr/bin/env bash
# Compile-and-link check of the CUDA extension on a machine without a GPU (so it cannot import
# the result: there is no driver). It builds meta_kernels._C with the CUDA kernels against a CUDA
# build of torch in its own venv (.venv-cuda, created once, reused after), into a temporary
# folder, so nothing is left in the source tree; then checks that every CUDA kernel and the
# Hopper (sm_90) device code are in the produced library, and runs the kernels' logic on the CPU
# under tests/cpp/cuda_emu (an emulation of CUDA blocks and threads) against the CPU kernels.
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "9.0":
# H100/H200), MAX_JOBS (default 2), PYTHON_BASE (the python that creates the venv, default python3).
set -euo pipefail

start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv-cuda"
py="$venv/bin/python"
torch_version=2.14.1

# 1. The venv: reuse it when it already holds the CUDA torch and the build tools.
if ! "$py" -c "import torch, numpy, ninja, pybind11, setuptools, wheel
assert torch.__version__.split('+')[0] == '$torch_version', torch.__version__
assert torch.version.cuda, 'torch is not a CUDA build'" >/dev/null 2>&1; then
  echo "build_cuda: setting up $venv (torch $torch_version with CUDA)"
  [ -x "$py" ] || "${PYTHON_BASE:-python3}" -m venv "$venv"
  "$venv/bin/pip" install --quiet "torch==$torch_version" numpy ninja pybind11 setuptools wheel
  "$py" -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'"
fi
echo "build_cuda: $("$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

# 2. The toolkit.
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build_cuda: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2; exit 1; }
export PATH="$CUDA_HOME/bin:$venv/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export META_KERNELS_CUDA=1
export META_KERNELS_OPT="${META_KERNELS_OPT:-0}"  # a compile-and-link check: host code unoptimised, twice as fast to build
export MAX_JOBS="${MAX_JOBS:-2}"
echo "build_cuda: $("$CUDA_HOME/bin/nvcc" --version | tail -1); archs $TORCH_CUDA_ARCH_LIST; $MAX_JOBS jobs"

# 3. Build out of tree. Shared objects already in the tree (a CPU build of the other venv) are
# listed first so that the check below only flags what this build would have added.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mk-cuda-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
list_artifacts() {
  find "$repo" \( -path "$repo/.venv" -o -path "$repo/.venv-cuda" -o -path "$repo/.git" \) -prune -o \
    \( -name '*.so' -o -name '*.egg-info' -o -path "$repo/build" \) -print | sort
}
list_artifacts >"$tmp/before"
(cd "$repo" && "$py" setup.py build_ext --build-temp "$tmp/temp" --build-lib "$tmp/lib") >"$tmp/build.log" 2>&1 || {
  tail -n 80 "$tmp/build.log" >&2
  echo "build_cuda: FAILED to build the CUDA extension" >&2
  exit 1
}
grep -E "warning|meta_kernels:" "$tmp/build.log" | grep -v "^\s*$" | head -n 40 || true
list_artifacts >"$tmp/after"
if ! cmp -s "$tmp/before" "$tmp/after"; then
  echo "build_cuda: the build left files in the source tree:" >&2
  comm -13 "$tmp/before" "$tmp/after" >&2
  exit 1
fi

# 4. What was built: the library, every kernel, device code for the requested archs.
so=$(find "$tmp/lib" -name '_C*.so' | head -n 1)
[ -n "$so" ] || { echo "build_cuda: no _C*.so produced" >&2; exit 1; }
echo "build_cuda: built $(basename "$so") ($(du -h "$so" | cut -f1))"
symbols="$tmp/symbols"
# Kernels live in an anonymous namespace: their host stubs are in the static symbol table and their
# (mangled) names in the registration strings, not in the dynamic table.
{ nm -C "$so" 2>/dev/null || true; strings -a "$so"; } >"$symbols"
missing=0
for kernel in sgd_step_kernel sumsq_kernel clip_finalize_kernel bn_forward_kernel bn_backward_kernel bn_double_backward_kernel reptile_kernel \
    pool_relu_kernel pool_relu_backward_kernel pool_relu_gather_kernel momentum_step_kernel adam_step_kernel; do
  if grep -q "$kernel" "$symbols"; then
    echo "build_cuda: kernel $kernel: present"
  else
    echo "build_cuda: kernel $kernel: MISSING" >&2
    missing=1
  fi
done
# The CUDA op registrations must be linked in too.
grep -q "sgd_step_cuda\|TORCH_LIBRARY_IMPL\|meta_kernels" "$symbols" || { echo "build_cuda: no meta_kernels registration" >&2; missing=1; }
for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
  sm="sm_${arch//./}"
  sm="${sm%+PTX}"
  # The ptxas options of each device image (-arch sm_XX) stay readable in the fat binary.
  if grep -q -- "-arch $sm" "$symbols"; then echo "build_cuda: device code for $sm: present"; else
    echo "build_cuda: device code for $sm: MISSING" >&2; missing=1; fi
done
[ "$missing" = 0 ] || { echo "build_cuda: FAILED" >&2; exit 1; }
echo "build_cuda: compile and link OK in $(( $(date +%s) - start )) s"

# 5. The kernels' logic, run on the CPU under an emulation of CUDA threads and blocks and compared
# with the CPU kernels (tests/cpp/cuda_emu; about 1.5 minutes). MK_CUDA_EMULATION=0 skips it.
if [ "${MK_CUDA_EMULATION:-1}" != 0 ]; then
  emu_python="$repo/.venv/bin/python"
  [ -x "$emu_python" ] || emu_python="$py"
  PYTHON="$emu_python" "$repo/tests/cpp/cuda_emu/run.sh"
fi
echo "build_cuda: OK in $(( $(date +%s) - start )) s"
