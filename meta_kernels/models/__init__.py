from meta_kernels.models.conv4 import Conv4
from meta_kernels.models.mlp import MLP
from meta_kernels.models.vit import ViT, vit_param_count

__all__ = ["Conv4", "MLP", "ViT", "vit_param_count"]
