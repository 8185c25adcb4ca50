"""BadNets data poisoning: stamp a trigger on part of the training set and relabel it.

Gu et al. 2017 (arXiv 1708.06733) use two relabellings:

- ``all-to-one``: every poisoned image is relabelled to one ``target`` class;
- ``all-to-all``: an image of class y is relabelled to (y + 1) mod C.

The poison rate is the fraction of the *whole* training set that is stamped and
relabelled: ``round(rate * n)`` images, rounded half up. For all-to-one they are drawn
among the images whose label is not the target, as is standard (BackdoorBench does the
same): stamping a target-class image and "relabelling" it to its own class teaches the
model nothing about the trigger, so such picks would silently lower the real rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor._checks import (
    expect_fraction,
    expect_images,
    expect_int,
    expect_labels,
)
from gauntlet.workers.backdoor.triggers import Trigger, expect_trigger

MODES = ("all-to-one", "all-to-all")


@dataclass(frozen=True)
class PoisonedData:
    """A training set after poisoning, and which of its images were poisoned."""

    x: torch.Tensor  # (n, C, H, W): the poisoned images stamped, the others untouched
    y: torch.Tensor  # (n,): the poisoned images relabelled, the others untouched
    indices: torch.Tensor  # int64, sorted: the positions that were stamped and relabelled


def check_mode(mode: str, target: int | None, num_classes: int) -> int | None:
    """Validate a relabelling; the target class for all-to-one, None for all-to-all."""
    expect_int("num_classes", num_classes, 2)
    if mode not in MODES:
        raise GauntletError(f"Expected `mode` to be one of {', '.join(MODES)}, but got {mode!r}")
    if mode == "all-to-all":
        if target is not None:
            raise GauntletError("all-to-all relabels y to (y + 1) mod C; it takes no `target`")
        return None
    if target is None:
        raise GauntletError("an all-to-one backdoor needs a `target` class")
    return expect_int("target", target, 0, num_classes - 1)


def backdoor_labels(
    y: torch.Tensor, mode: str, target: int | None, num_classes: int
) -> torch.Tensor:
    """The label the attacker wants for each image once triggered."""
    target = check_mode(mode, target, num_classes)
    if target is None:
        return (y + 1) % num_classes
    return torch.full_like(y, target)


def poison_count(rate: float, n: int) -> int:
    """How many of n images a poison rate stamps: round(rate * n), rounded half up."""
    return math.floor(expect_fraction("rate", rate) * n + 0.5)


def poison_dataset(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    *,
    rate: float,
    num_classes: int,
    mode: str = "all-to-one",
    target: int | None = None,
    seed: int = 0,
) -> PoisonedData:
    """Stamp and relabel ``round(rate * len(x))`` seeded picks of (x, y).

    All-to-one picks only among images not already of the target class (see the module
    docstring); rate 0 returns the data unchanged, for a clean reference model.
    """
    trigger = expect_trigger("trigger", trigger)
    x = expect_images("x", x)
    y = expect_labels("y", y, len(x), expect_int("num_classes", num_classes, 2))
    target = check_mode(mode, target, num_classes)
    seed = expect_int("seed", seed, 0)
    count = poison_count(rate, len(x))
    labels = y.cpu().numpy()
    eligible = np.flatnonzero(labels != target) if target is not None else np.arange(len(y))
    if count > len(eligible):
        raise GauntletError(
            f"a poison rate of {rate} needs {count} images, but only {len(eligible)} are "
            f"eligible (all-to-one poisons only images outside the target class {target})"
        )
    # numpy's Generator: the same picks on every platform (as for the evaluation subsets).
    picked = np.sort(np.random.default_rng(seed).choice(eligible, size=count, replace=False))
    indices = torch.from_numpy(picked.astype(np.int64)).to(x.device)
    x_out, y_out = x.clone(), y.clone()
    if count:
        x_out[indices] = trigger.stamp(x[indices])
        y_out[indices] = backdoor_labels(y[indices], mode, target, num_classes)
    return PoisonedData(x_out, y_out, indices)
