"""Data for the defenses: transfer-learning target tasks and the defender's clean split.

Gu et al. 2017 (arXiv 1708.06733, Section 5.3) fine-tune a backdoored US traffic-sign
model on Swedish traffic signs. On digits we build two such target tasks:

- ``shift_domain``: the same ten labels in a shifted domain. The shift is deterministic:
  each image moves ``dx`` pixels left (default 1, zero fill, so the digit never covers
  the bottom-right trigger area) and its contrast is compressed to
  ``brightness + contrast * x`` (default 0.15 + 0.7 x: grey background, dimmer strokes).
  A small translation plus a contrast change is the kind of shift between two sets of
  street-sign photographs, at a size where the source model still helps.
- ``label_split``: disjoint classes. Source task digits 0-4, target task digits 5-9,
  both relabelled 0..4, so the target model needs a new 5-way head.

``clean_subset`` is the defender's small clean split (5% of the training data for the
fine-tuning baseline, as in BackdoorBench), stratified so that every class is in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor._checks import (
    expect_float,
    expect_fraction,
    expect_images,
    expect_int,
)


def shift_domain(
    x: torch.Tensor, *, dx: int = 1, contrast: float = 0.7, brightness: float = 0.15
) -> torch.Tensor:
    """Images moved ``dx`` pixels left (zero fill), then ``brightness + contrast * x``."""
    x = expect_images("x", x)
    dx = expect_int("dx", dx, 0, x.shape[3] - 1)
    contrast = expect_float("contrast", contrast, 0.0, 1.0)
    brightness = expect_float("brightness", brightness, -1.0, 1.0)
    if brightness < 0 or brightness + contrast > 1:
        raise GauntletError(
            f"brightness + contrast * x must stay in [0, 1] for x in [0, 1]; got "
            f"brightness {brightness} and contrast {contrast}"
        )
    moved = torch.zeros_like(x)
    moved[..., : x.shape[3] - dx] = x[..., dx:]
    return brightness + contrast * moved


def label_split(
    x: torch.Tensor,
    y: torch.Tensor,
    source: Sequence[int] = (0, 1, 2, 3, 4),
    target: Sequence[int] = (5, 6, 7, 8, 9),
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x, y) of the source classes, (x, y) of the target classes), each relabelled 0..k-1.

    Labels follow the order given: ``source[i]`` becomes i, ``target[i]`` becomes i.
    """
    x = expect_images("x", x)
    source, target = [list(map(int, s)) for s in (source, target)]
    if not source or not target or set(source) & set(target):
        raise GauntletError(
            f"Expected two non-empty, disjoint lists of classes, but got {source} and {target}"
        )
    if len(set(source)) != len(source) or len(set(target)) != len(target):
        raise GauntletError(f"a class appears twice in {source} or {target}")

    def select(classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.isin(y, torch.tensor(classes, device=y.device))
        old = y[keep]
        new = torch.empty_like(old)
        for label, cls in enumerate(classes):
            new[old == cls] = label
        return x[keep], new

    return select(source), select(target)


def clean_subset(
    x: torch.Tensor, y: torch.Tensor, fraction: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, class-stratified ``fraction`` of (x, y): at least one image per class.

    Each class contributes round(fraction * its size), at least 1, so a 5% split of a
    small dataset (67 of 1347 digits) still covers all ten classes.
    """
    fraction = expect_fraction("fraction", fraction)
    if fraction == 0:
        raise GauntletError("Expected `fraction` to be above 0")
    rng = np.random.default_rng(expect_int("seed", seed, 0))
    labels = y.cpu().numpy()
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = max(1, int(np.floor(fraction * len(members) + 0.5)))
        picked.append(rng.choice(members, size=count, replace=False))
    index = torch.from_numpy(np.sort(np.concatenate(picked)).astype(np.int64)).to(x.device)
    return x[index], y[index]
