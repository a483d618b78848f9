"""Triton kernels, one file per op: each holds the kernels and a launcher per schema entry point
(named as the op). meta_kernels.ops defines the `meta_kernels_triton` namespace from them; nothing
here imports from meta_kernels.ops."""
