"""Per-example losses that attacks maximise (Croce & Hein 2020).

All take logits of shape (n, classes) and return a loss of shape (n,): attacks sum it
before the backward pass, so each example's gradient is independent of its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError

# Keeps the DLR ratios finite when the top logits tie (a constant model, a saturated
# ReLU net); the value of the official code, so losses compare one to one.
_DLR_TINY = 1e-12


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of the true class (untargeted: maximise it)."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The difference-of-logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3).

    pi sorts the logits in decreasing order. The ratio is invariant to shifting and
    rescaling the logits, so (unlike cross-entropy) it cannot be flattened by a model
    that simply outputs huge logits. Positive exactly when x is misclassified.
    """
    if logits.shape[1] < 3:
        raise GauntletError(f"The DLR loss needs at least 3 classes, but got {logits.shape[1]}")
    top, order = logits.topk(3, dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    # The best other class is pi1, unless pi1 is y itself.
    other = torch.where(order[:, 0] == y, top[:, 1], top[:, 0])
    return -(z_y - other) / (top[:, 0] - top[:, 2] + _DLR_TINY)


def targeted_dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).

    The denominator averages pi3 and pi4 because with a target pi1 and pi2 are y and t
    at the boundary, and pi3 alone could tie with them.
    """
    if logits.shape[1] < 4:
        raise GauntletError(
            f"The targeted DLR loss needs at least 4 classes, but got {logits.shape[1]}"
        )
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_TINY
    return -(z_y - z_t) / scale
