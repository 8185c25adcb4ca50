"""Argument checks shared by PATE's aggregation and its privacy accounting.

Every check raises ``GauntletError`` with a message that names the argument. Where the
aggregation and the accounting check the same parameter, one function serves both and
the caller says which wording applies: drawing noise and bounding eps reject the same
values, but for different reasons, and the message says why.

Vote counts are accepted as anything ``numpy.asarray`` takes (numpy arrays, nested
lists) or a torch tensor on any device, shaped ``(queries, classes)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from gauntlet.cluster.errors import GauntletError

# The aggregation's wording for a sigma out of range; the accounting uses the default.
NOISE_SIGMA_RANGE = "{name} (a noise standard deviation) must be finite and >= 0, got {value}"


def check_number(value: object, name: str) -> None:
    """``value`` is a real number (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GauntletError(f"{name} must be a number, but got {value!r}")


def check_gamma(gamma: float | None, *, accounting: bool = False, allow_off: bool = False) -> None:
    """LNMax's gamma (the inverse Laplace scale) must be a finite number > 0.

    ``allow_off`` also admits None and infinity, which switch the noise off. With
    ``accounting`` the messages say that no noise has no DP to account for.
    """
    if gamma is None and allow_off:
        return
    if accounting:
        check_number(gamma, "gamma")
        if not math.isfinite(gamma) or gamma <= 0:
            raise GauntletError(
                "gamma must be finite and > 0 to account for LNMax (no noise has no DP), "
                f"got {gamma}"
            )
        return
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or math.isnan(gamma):
        raise GauntletError(f"gamma must be a positive number, but got {gamma!r}")
    if gamma <= 0:
        raise GauntletError(f"gamma (the inverse Laplace scale) must be > 0, but got {gamma}")
    if math.isinf(gamma) and not allow_off:
        raise GauntletError("gamma must be finite to draw Laplace noise")


def check_sigma(
    sigma: float, name: str, out_of_range: str = "{name} must be finite and >= 0, but got {value}"
) -> None:
    """A Gaussian noise scale ``name`` must be a finite number >= 0 (0: no noise)."""
    check_number(sigma, name)
    if not math.isfinite(sigma) or sigma < 0:
        raise GauntletError(out_of_range.format(name=name, value=sigma))


def check_positive_sigma(sigma: float, name: str) -> None:
    check_sigma(sigma, name)
    if sigma == 0:
        raise GauntletError(f"{name} must be > 0 to account for it (no noise has no DP)")


def check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise GauntletError(f"delta must lie in (0, 1), but got {delta!r}")


def check_num_queries(num_queries: int) -> None:
    if (
        isinstance(num_queries, bool)
        or not isinstance(num_queries, numbers.Integral)
        or num_queries < 0
    ):
        raise GauntletError(f"num_queries must be an integer >= 0, but got {num_queries!r}")


def check_moment(moment: float) -> None:
    check_number(moment, "A moment")
    if not math.isfinite(moment) or moment <= 0:
        raise GauntletError(f"Moments must be finite and > 0, but got {moment}")


def check_moments(moments: Sequence[float]) -> list[float]:
    values = list(moments)
    if not values:
        raise GauntletError("At least one moment is needed")
    for moment in values:
        check_moment(moment)
    return values


def check_orders(orders: Sequence[float]) -> np.ndarray:
    array = np.asarray(orders, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise GauntletError(f"RDP orders must be a non-empty vector, but got shape {array.shape}")
    if not np.all(np.isfinite(array)) or array.min() <= 1:
        raise GauntletError("RDP orders must be finite and > 1")
    return array


def to_numpy(values: object) -> object:
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return values


def as_counts(counts: object) -> np.ndarray:
    """``(queries, classes)`` vote counts as a float64 array."""
    array = np.asarray(to_numpy(counts))
    if array.ndim != 2 or array.shape[1] < 1:
        raise GauntletError(
            "Vote counts must be 2-D (queries, classes) with at least one class, "
            f"but got shape {array.shape}"
        )
    return _checked_votes(array)


def as_vote_vector(votes: object) -> np.ndarray:
    """One query's vote counts as a float64 vector."""
    array = np.asarray(to_numpy(votes))
    if array.ndim != 1 or array.size < 1:
        raise GauntletError(
            f"One query's votes must be a non-empty vector, got shape {array.shape}"
        )
    return _checked_votes(array)


def _checked_votes(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise GauntletError(f"Vote counts must be numbers, not {array.dtype}")
    array = array.astype(np.float64)
    if array.size and (not np.all(np.isfinite(array)) or array.min() < 0):
        raise GauntletError("Vote counts must be finite and non-negative")
    return array
