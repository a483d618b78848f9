#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU) and everything meta_kernels and its tests need, then
# builds meta_kernels against that torch. Idempotent: a second run only rebuilds the extension.
#
# torch is installed first, on its own, from the pinned release: with it present, pip never pulls
# another torch, and --no-build-isolation builds against exactly this one.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || "${pip[@]}" torch==2.13.0
"${pip[@]}" setuptools wheel ninja pybind11
"${pip[@]}" --no-build-isolation -e ".[test]"
.venv/bin/python -c "import meta_kernels as mk; b = mk.backend_info(); print('meta_kernels', mk.__version__, \
'| torch', b['torch'], '| compiled:', {k: b['extension'][k] for k in ('cpu', 'cuda', 'openmp', 'num_threads')}, \
'| auto on cpu:', b['auto']['cpu'])"
