"""Tiny models and objects the tests build through the ``python:`` source."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def tiny_cnn(num_classes: int = 10, width: int = 8) -> nn.Module:
    """A conv-bn-relu-pool-linear classifier on 3×16×16 inputs (declares ``input_shape``)."""
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
    model.input_shape = (3, 16, 16)
    return model


def sliceable_mlp_cnn(num_classes: int = 10, width: int = 16, in_chans: int = 1) -> nn.Module:
    """conv-bn-relu ×2 → pool → linear-relu → linear on 1×8×8 (digits): conv and dense layers to slice."""
    model = nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 2 * width),
        nn.ReLU(),
        nn.Linear(2 * width, num_classes),
    )
    model.input_shape = (in_chans, 8, 8)
    return model


def seeded_mlp_cnn(num_classes: int = 10, width: int = 16, seed: int = 0) -> nn.Module:
    """``sliceable_mlp_cnn`` initialised from ``seed`` (the same weights on every call; global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return sliceable_mlp_cnn(num_classes=num_classes, width=width)


def classifier_only(num_classes: int = 10) -> nn.Module:
    """Flatten → Linear(64, classes) on 1×8×8 (digits): no hidden unit, so no prunable unit group."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    model.input_shape = (1, 8, 8)
    return model


def not_a_model() -> str:
    """A factory that returns something other than a module."""
    return "not a model"


@dataclass
class TrainingConfig:
    """A plain Python object that a training script might pickle next to the weights."""

    lr: float = 0.1
    epochs: int = 3
