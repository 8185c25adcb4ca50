"""Parameter checks shared by the backdoor modules, with the project's message template.

Everything a user can pass (JSON params of a trigger, a poison rate, a class index) goes
through these, so a bad value is a GauntletError that says what was expected.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.hyperparams import expect_float, expect_int
from gauntlet.workers.models import Normalized

__all__ = [
    "expect_float",
    "expect_fraction",
    "expect_images",
    "expect_int",
    "expect_labels",
    "expect_model",
    "expect_unit_values",
]


def expect_fraction(name: str, value: Any) -> float:
    """A float in [0, 1] (0 is allowed, unlike ``expect_float``'s half-open range)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise GauntletError(f"Expected `{name}` to be a float in [0, 1], but got {value!r}")
    return float(value)


def expect_unit_values(name: str, value: Any) -> tuple[float, ...]:
    """One number or a list of numbers, each in [0, 1] (a colour: one value or per channel)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise GauntletError(f"Expected `{name}` to hold at least one value in [0, 1]")
    return tuple(expect_fraction(name, v) for v in values)


def expect_images(name: str, x: Any) -> torch.Tensor:
    """A floating tensor of shape (n, C, H, W)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise GauntletError(
            f"Expected `{name}` to be a float tensor of images (n, C, H, W), but got {shape}"
        )
    return x


def expect_labels(name: str, y: Any, n: int, num_classes: int) -> torch.Tensor:
    """An integer tensor of n labels in [0, num_classes)."""
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.is_floating_point() or len(y) != n:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise GauntletError(f"Expected `{name}` to be {n} integer labels, but got {shape}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise GauntletError(
            f"Expected `{name}` to lie in [0, {num_classes - 1}], "
            f"but got values from {int(y.min())} to {int(y.max())}"
        )
    return y


def expect_model(name: str, model: Any) -> Normalized:
    """A pixel-space model (``Normalized``): it carries the input spec the code needs."""
    if not isinstance(model, Normalized):
        raise GauntletError(
            f"Expected `{name}` to be a pixel-space model (workers.models.Normalized, as "
            f"load_classifier returns), but got {type(model).__name__}"
        )
    return model
