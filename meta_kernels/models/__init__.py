from meta_kernels.models.conv4 import Conv4
from meta_kernels.models.mlp import MLP

__all__ = ["Conv4", "MLP"]
