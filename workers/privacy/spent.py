"""What an accountant returns: an (eps, delta)-DP guarantee and how it was reached."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrivacySpent:
    """An (eps, delta)-DP guarantee and how it was reached.

    ``order`` is the optimal moment l (LNMax) or RDP order lambda (GNMax); ``queries``
    is the number of queries charged, ``answered`` how many of them released a label
    (fewer than ``queries`` only for Confident-GNMax, which charges refusals too).
    """

    eps: float
    delta: float
    order: float
    queries: int
    answered: int


def best_on_grid(eps: np.ndarray, grid: np.ndarray) -> tuple[float, float]:
    """(eps, grid point) at the smallest eps: both conversions to (eps, delta)-DP end so."""
    best = int(np.argmin(eps))
    return float(eps[best]), float(grid[best])
