"""Shared pieces of the attack tests: seeded generators, the digits CNN, linear models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gauntlet.workers.datasets import eval_subset
from gauntlet.workers.models import InputSpec, load_classifier

NEW = ("bim", "mi-fgsm", "r-fgsm", "pgd-targeted", "deepfool", "cw-l2")
# Fast CW settings: lr 0.2 lets saturated digit pixels move within 50 steps (see cw.py).
CW_FAST = {"steps": 50, "binary_steps": 4, "initial_const": 0.1, "lr": 0.2}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def standard(digits_models) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, x, y): the undefended digits CNN and 200 test points."""
    spec = InputSpec(1, 8, 8, 10)
    model = load_classifier(digits_models["standard"], "small-cnn", spec).eval()
    x, y, _ = eval_subset("digits", 200, 0, None)
    return model, x, y


@pytest.fixture(scope="module")
def correct(standard) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, x, y): the first 100 points, only those the model gets right."""
    model, x, y = standard
    x, y = x[:100], y[:100]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return model, x[keep], y[keep]


def accuracy(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def binary_linear(w: torch.Tensor, b: float) -> nn.Module:
    """Logits (0, w.x + b): the boundary is the hyperplane w.x + b = 0.

    For label 0 the cross-entropy gradient is sigmoid(w.x + b) * w.
    """
    layer = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[1] = w
        layer.bias[1] = b
    return nn.Sequential(nn.Flatten(), layer).eval()
