"""Plain nn.Modules as users write them (no forward_tasks): the peers' Conv4 as an nn.Sequential
and MetaOptNet's ResNet-12. They run their tasks batched through the engine like any user model;
the tests and benchmarks of the engine use them."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


def sequential_conv4(n_way: int = 5, in_channels: int = 1, filters: int = 64) -> nn.Sequential:
    """4 x [Conv2d 3x3, BatchNorm2d (batch statistics), ReLU, MaxPool2d(2)], Flatten, Linear: the
    Conv4 of learn2learn / higher users, for 28x28 inputs (1x1 features after four poolings)."""
    layers = []
    for i in range(4):
        layers += [nn.Conv2d(in_channels if i == 0 else filters, filters, 3, padding=1),
                   nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, n_way))


class ResBlock(nn.Module):
    """MetaOptNet's ResNet-12 block: three 3x3 conv-BN(-LeakyReLU) layers, a 1x1 conv-BN shortcut,
    LeakyReLU after the sum, 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.c3, self.b3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        h = F.leaky_relu(self.b1(self.c1(x)), 0.1)
        h = F.leaky_relu(self.b2(self.c2(h)), 0.1)
        h = self.b3(self.c3(h))
        return self.pool(F.leaky_relu(h + self.shortcut(x), 0.1))


class ResNet12(nn.Module):
    """Four ResBlocks (64-160-320-640 by default), global average pooling, a linear head."""

    def __init__(self, n_way: int = 5, widths: tuple[int, ...] = (64, 160, 320, 640), in_channels: int = 3):
        super().__init__()
        chans = (in_channels, *widths)
        self.blocks = nn.Sequential(*[ResBlock(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Linear(widths[-1], n_way)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1))
