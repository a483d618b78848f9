"""Builds meta_kernels._C against the torch that is already installed.

Install with `pip install --no-build-isolation .`: an isolated build would fetch a different
torch (often a multi-GB CUDA build) and compile against the wrong version.

META_KERNELS_CUDA=1 forces the CUDA kernels (fails if they cannot be built), =0 skips them;
unset, they are built when torch is a CUDA build and a CUDA toolkit is found.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - only hit by a misconfigured build
    sys.exit("meta_kernels: torch must be installed before building. Install torch first, then run "
             "`pip install --no-build-isolation .` so the build uses that torch.")


def cuda_decision():
    """(build_cuda, reason) from the environment, torch and the toolkit."""
    forced = os.environ.get("META_KERNELS_CUDA", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False, "META_KERNELS_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME)")
    if forced in ("1", "true", "yes", "on"):
        if problems:
            sys.exit("meta_kernels: META_KERNELS_CUDA=1 but " + "; ".join(problems))
        return True, "META_KERNELS_CUDA=1"
    return (not problems), "; ".join(problems)


here = os.path.dirname(os.path.abspath(__file__))
sources = [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")) +
                                                    glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp")))]
build_cuda, reason = cuda_decision()
torch_version = torch.__version__.split("+")[0]
define_macros = [("META_KERNELS_TORCH_VERSION", f'"{torch_version}"')]
# No -std: BuildExtension adds the standard the installed torch builds with (C++17 for 2.13,
# C++20 for 2.14, whose headers no longer compile as C++17).
# META_KERNELS_OPT=0 (the CI's CUDA compile-and-link check) compiles host code unoptimised, in
# about half the time; device code is optimised by ptxas either way.
opt = "-O" + os.environ.get("META_KERNELS_OPT", "3")
cxx_flags = [opt, "-g0", "-fopenmp", "-fno-math-errno"]  # no errno: sqrt in a loop can vectorize
extra_link_args = ["-fopenmp"]

if build_cuda:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources += [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))]
    define_macros += [("META_KERNELS_WITH_CUDA", None), ("META_KERNELS_CUDA_ARCHS", f'"{archs}"')]
    # A pip CUDA torch ships the CUDA library headers it was built with (cuBLAS, cuSPARSE, ... that
    # ATen's CUDA headers include) in site-packages/nvidia/: cu13/include for CUDA 13 wheels, one
    # folder per library (cuda_runtime/include, cublas/include, ...) for CUDA 12 wheels. A toolkit
    # at CUDA_HOME often lacks those libraries, so add them after the toolkit's own include folder
    # (which keeps precedence for the headers nvcc itself depends on).
    site_packages = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    cuda_include_dirs = [os.path.join(CUDA_HOME, "include")] + sorted(
        d for d in glob.glob(os.path.join(site_packages, "nvidia", "*", "include")) if os.path.isdir(d))
    ext = CUDAExtension(
        "meta_kernels._C", sources, define_macros=define_macros, include_dirs=cuda_include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": [opt, "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=extra_link_args)
    print(f"meta_kernels: building CPU and CUDA kernels (archs {archs}; {reason or 'CUDA available'})")
else:
    ext = CppExtension("meta_kernels._C", sources, define_macros=define_macros,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link_args)
    print(f"meta_kernels: building CPU kernels only; CUDA skipped: {reason}")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
