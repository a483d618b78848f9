"""The peers' own example models, written as their users write them: the workloads of the
compat benchmarks and tests (a user switching to us brings these, not our Conv4).

- `OmniglotFC`: learn2learn's fully connected Omniglot net (Santoro et al. 2016), the model of
  learn2learn's examples/vision/maml_omniglot.py: Flatten, 4 x [Linear -> BatchNorm1d (batch
  statistics only, eps 1e-3) -> ReLU] (256-128-64-64), Linear.
- `OmniglotCNN`: learn2learn's convolutional Omniglot net: 4 x [Conv 3x3 stride 2 padding 1 ->
  BatchNorm2d with running statistics -> ReLU] (no pooling), mean over space, Linear.
- `higher_omniglot_net`: the network of higher's examples/maml-omniglot.py: 3 x [Conv 3x3 (no
  padding) -> BatchNorm2d(momentum=1) with running statistics -> ReLU(inplace) -> MaxPool 2],
  Flatten, Linear.
- `mlp`: a plain MLP without normalisation.

Initialisations follow the originals where they differ from torch's defaults (learn2learn's
truncated normal is drawn with torch's generator here)."""
from __future__ import annotations

import torch
from torch import nn

from meta_kernels.compat.learn2learn.nn import Flatten, Lambda


def _fc_init_(linear: nn.Linear) -> nn.Linear:
    # learn2learn's fc_init_: truncated normal (2 std), std 0.01, zero bias.
    nn.init.trunc_normal_(linear.weight, std=0.01, a=-0.02, b=0.02)
    nn.init.zeros_(linear.bias)
    return linear


class LinearBlock(nn.Module):
    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(output_size, affine=True, momentum=0.999, eps=1e-3,
                                        track_running_stats=False)
        self.linear = _fc_init_(nn.Linear(input_size, output_size))

    def forward(self, x):
        return self.relu(self.normalize(self.linear(x)))


class OmniglotFC(nn.Module):
    def __init__(self, input_size: int = 28 ** 2, output_size: int = 5, sizes=(256, 128, 64, 64)):
        super().__init__()
        blocks = [LinearBlock(input_size, sizes[0])] + [LinearBlock(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.features = nn.Sequential(Flatten(), nn.Sequential(*blocks))
        self.classifier = _fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x):
        return self.classifier(self.features(x))


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.max_pool = lambda x: x  # learn2learn's ConvBlock with max_pool=False: stride 2 instead
        self.normalize = nn.BatchNorm2d(out_channels, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=True)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    def __init__(self, hidden: int = 64, channels: int = 1, layers: int = 4):
        super().__init__(*[ConvBlock(channels if i == 0 else hidden, hidden) for i in range(layers)])


class OmniglotCNN(nn.Module):
    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, layers=layers)
        self.features = nn.Sequential(Lambda(lambda x: x.view(-1, 1, 28, 28)), self.base,
                                      Lambda(lambda x: x.mean(dim=[2, 3])), Flatten())
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        self.classifier.weight.data.normal_()
        self.classifier.bias.data.mul_(0.0)

    def forward(self, x):
        return self.classifier(self.features(x))


def higher_omniglot_net(n_way: int = 5) -> nn.Sequential:
    layers = []
    for i in range(3):
        layers += [nn.Conv2d(1 if i == 0 else 64, 64, 3), nn.BatchNorm2d(64, momentum=1, affine=True),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
    return nn.Sequential(*layers, Flatten(), nn.Linear(64, n_way))


def mlp(n_way: int = 5, input_size: int = 28 ** 2, hidden: tuple[int, ...] = (256, 128)) -> nn.Sequential:
    sizes = (input_size, *hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], n_way))


PEER_MODELS = {"omniglot_fc": OmniglotFC, "omniglot_cnn": OmniglotCNN, "higher_net": higher_omniglot_net, "mlp": mlp}
