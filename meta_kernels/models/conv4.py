"""Conv4: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2] and a linear head (Finn et al. 2017).

Besides the ordinary nn.Module forward, `forward_tasks` runs T tasks with T sets of weights in
one computation: activations are laid out [N, T*C, H, W], so every conv is one grouped
convolution (groups = T) and per-task BatchNorm is ordinary BatchNorm over T*C channels --
statistics never mix tasks, and no Python loop over tasks runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import meta_kernels.ops as ops


class Conv4(nn.Module):
    def __init__(self, in_channels: int = 1, n_way: int = 5, filters: int = 64, image_size: int = 28):
        super().__init__()
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}")
        self.in_channels, self.n_way, self.filters, self.image_size = in_channels, n_way, filters, image_size
        blocks, c_in, size = [], in_channels, image_size
        for _ in range(4):
            blocks.append(nn.ModuleDict({"conv": nn.Conv2d(c_in, filters, 3, padding=1),
                                         "bn": nn.BatchNorm2d(filters, track_running_stats=False)}))
            c_in, size = filters, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 poolings (needs >= 16)")
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = filters * size * size
        self.head = nn.Linear(self.feature_dim, n_way)

    @classmethod
    def omniglot(cls, n_way: int = 5) -> "Conv4":
        return cls(in_channels=1, n_way=n_way, filters=64, image_size=28)

    @classmethod
    def mini_imagenet(cls, n_way: int = 5, filters: int = 32) -> "Conv4":
        return cls(in_channels=3, n_way=n_way, filters=filters, image_size=84)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = F.max_pool2d(F.relu(block["bn"](block["conv"](x))), 2)
        return self.head(x.flatten(1))

    @staticmethod
    def forward_tasks(params: dict[str, Tensor], x: Tensor, *, bn_backend: str | None = None) -> Tensor:
        """Logits [T, N, n_way] of x [T, N, C, H, W] under per-task params (each [T, *shape])."""
        T, N = x.shape[0], x.shape[1]
        h = x.transpose(0, 1).reshape(N, T * x.shape[2], *x.shape[3:])
        for i in range(4):
            w = params[f"blocks.{i}.conv.weight"]
            c_out = w.shape[1]
            h = F.conv2d(h, w.reshape(T * c_out, *w.shape[2:]), params[f"blocks.{i}.conv.bias"].reshape(-1),
                         padding=1, groups=T)
            # [N, T*C, H, W] seen as one task of T*C channels: per-(task, channel) statistics.
            h = ops.batch_norm(h.unsqueeze(0), params[f"blocks.{i}.bn.weight"].reshape(1, -1),
                               params[f"blocks.{i}.bn.bias"].reshape(1, -1), backend=bn_backend).squeeze(0)
            # Pool before ReLU: the same function (both monotone), on a 4x smaller tensor.
            h = F.relu(F.max_pool2d(h, 2))
        feats = h.reshape(N, T, -1)
        return torch.einsum("ntd,tkd->tnk", feats, params["head.weight"]) + params["head.bias"].unsqueeze(1)
