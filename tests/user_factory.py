"""A user's own model for the CLI test: `meta-kernels train --model tests.user_factory:small_cnn`."""
from torch import nn


def small_cnn(n_way: int, image_shape: tuple[int, ...]) -> nn.Module:
    c = image_shape[0]
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, n_way))


def not_a_model(n_way: int, image_shape: tuple[int, ...]):
    return "a string"


def raises(n_way: int, image_shape: tuple[int, ...]):
    raise KeyError("hidden_size")


def wrong_width(n_way: int, image_shape: tuple[int, ...]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(image_shape[0] * image_shape[1] * image_shape[2], n_way + 2))


def no_params(n_way: int, image_shape: tuple[int, ...]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Identity())
