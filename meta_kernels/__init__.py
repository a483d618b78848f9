"""meta_kernels: gradient-based meta-learning on fused inner-loop kernels."""
__version__ = "0.1.0"
