from meta_kernels.models.conv4 import Conv4
from meta_kernels.models.mlp import MLP
from meta_kernels.models.plain import ResNet12, sequential_conv4
from meta_kernels.models.vit import ViT, vit_param_count

__all__ = ["MLP", "Conv4", "ResNet12", "ViT", "sequential_conv4", "vit_param_count"]
