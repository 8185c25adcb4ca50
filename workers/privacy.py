"""Privacy accounting for PATE's noisy vote aggregation.

Two analyses, each with a data-independent bound (a function of the noise and the
number of answered queries only) and a data-dependent one (which also reads the vote
counts, and is far smaller when the teachers agree):

- LNMax, the moments accountant of Papernot et al. 2017 (arXiv 1610.05755, Section 3
  and Appendix): log moments alpha(l) summed over queries, then
  eps = min_l (sum alpha(l) - ln delta) / l over the integer moments l = 1..8.
- GNMax and Confident-GNMax, the Renyi DP analysis of Papernot et al. 2018 (arXiv
  1802.08908): RDP of order lambda summed over queries, then
  eps = min_lambda (sum RDP(lambda) + ln(1 / delta) / (lambda - 1)).

A data-dependent eps depends on the private votes, so publishing it as is leaks
information; the 2018 paper releases it through smooth sensitivity, which is not
implemented here. Use it to compare and tune, and report the data-independent eps or a
sanitised one.

Vote counts are accepted as anything ``numpy.asarray`` takes (numpy arrays, nested
lists) or a torch tensor on any device, shaped ``(queries, classes)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gauntlet.cluster.errors import GauntletError

__all__ = [
    "DEFAULT_MOMENTS",
    "DEFAULT_ORDERS",
    "PrivacySpent",
    "confident_gnmax_eps",
    "gnmax_eps_data_dependent",
    "gnmax_eps_data_independent",
    "gnmax_log_q_bound",
    "gnmax_rdp_data_dependent",
    "gnmax_rdp_data_independent",
    "lnmax_eps_data_dependent",
    "lnmax_eps_data_independent",
    "lnmax_log_moment_data_dependent",
    "lnmax_log_moment_data_independent",
    "lnmax_q_bound",
    "moments_to_dp",
    "rdp_orders",
    "rdp_to_dp",
    "threshold_rdp_data_independent",
]

# The 2017 paper's accountant tracks the integer moments l = 1..8 (its reference code's
# default). The grid matters: the unanimous-votes reference value (eps = 1.442) is
# reached at l = 8, the edge of the grid, and more moments would give a smaller eps.
DEFAULT_MOMENTS: tuple[int, ...] = tuple(range(1, 9))


def rdp_orders(start: float = 2.0, step: float = 0.5, stop: float = 500.0) -> tuple[float, ...]:
    """The RDP orders start, start + step, ..., up to ``stop`` inclusive."""
    if not (math.isfinite(start) and math.isfinite(step) and math.isfinite(stop)):
        raise GauntletError("RDP order grid bounds must be finite")
    if start <= 1 or step <= 0 or stop < start:
        raise GauntletError(
            f"RDP orders need 1 < start <= stop and step > 0, but got {start}, {step}, {stop}"
        )
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return tuple(start + step * i for i in range(count))


# Orders 2, 2.5, ..., 500: the step of the 2018 paper's reference code, which the
# reference value eps = 4.693 (640 queries, sigma = 40) depends on. The top of the grid
# only binds when the optimum lies above it, i.e. when ln(1/delta) / (lambda - 1) at
# lambda = 500 is a noticeable part of eps: about 0.023 for delta = 1e-5, so an eps under
# roughly 0.05 may be overstated a little; anything larger is unaffected.
DEFAULT_ORDERS: tuple[float, ...] = rdp_orders()


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


# LNMax: moments accountant (Papernot et al. 2017)


def lnmax_log_moment_data_independent(gamma: float, moment: float) -> float:
    """Per-query bound on the l-th log moment of LNMax: min(2 gamma^2 l (l+1), 2 gamma l).

    LNMax is (2 gamma, 0)-DP; the first term is the paper's Theorem 2 bound for a pure
    eps-DP mechanism with eps = 2 gamma, the second the trivial eps * l.
    """
    _check_gamma(gamma)
    _check_moment(moment)
    return min(2.0 * gamma * gamma * moment * (moment + 1), 2.0 * gamma * moment)


def lnmax_q_bound(votes: Sequence[float] | np.ndarray, gamma: float) -> float:
    """Upper bound on Pr[LNMax does not return the plurality label] for one query.

    q <= sum_{j != j*} (2 + gamma Delta_j) / (4 exp(gamma Delta_j)), Delta_j = n_{j*} - n_j
    (Papernot et al. 2017, Appendix): a union bound over the classes that could beat
    the winner j*. Each term is exactly the probability that the difference of two
    Lap(1/gamma) variables exceeds Delta_j.
    """
    _check_gamma(gamma)
    votes = _as_vote_vector(votes)
    gaps = gamma * (votes.max() - np.delete(votes, int(np.argmax(votes))))
    # (2 + x) e^{-x} / 4 rather than / exp(x): no overflow for large margins.
    return float(np.sum((2.0 + gaps) * np.exp(-gaps) / 4.0))


def lnmax_log_moment_data_dependent(q: float, gamma: float, moment: float) -> float:
    """Per-query bound on the l-th log moment of LNMax given q >= Pr[answer != plurality].

    Papernot et al. 2017, Theorem 3: if q < (e^{2 gamma} - 1) / (e^{4 gamma} - 1), then
    alpha(l) <= log((1 - q) ((1 - q) / (1 - e^{2 gamma} q))^l + q exp(2 gamma l)).
    Where the condition fails, only the data-independent bound applies; the result is
    always the minimum of the two. Read this way (natural log, integer l = 1..8, the
    paper's condition on q), 100 unanimous votes of 250 teachers at gamma = 0.05 give
    eps = 1.442 at delta = 1e-5, the reference value (reached at l = 8; there q is about
    1.2e-4, far inside the condition, so the 2017 reference code's looser test q < 1/2
    gives the same number). The condition equals q < 1 / (e^{2 gamma} + 1), the form
    (with <=) that the 2018 reference code tests.
    """
    independent = lnmax_log_moment_data_independent(gamma, moment)
    if not (math.isfinite(q) and q >= 0):
        raise GauntletError(f"q must be a probability bound >= 0, but got {q}")
    if q >= (math.exp(2 * gamma) - 1) / (math.exp(4 * gamma) - 1):
        return independent
    if q == 0:
        return 0.0
    # The condition implies e^{2 gamma} q < 1, so the logarithms below are defined;
    # log1p keeps the ratio (1 - q) / (1 - e^{2 gamma} q) accurate when q is tiny.
    first = math.log1p(-q) + moment * (math.log1p(-q) - math.log1p(-math.exp(2 * gamma) * q))
    second = math.log(q) + 2 * gamma * moment
    return min(independent, float(np.logaddexp(first, second)))


def moments_to_dp(
    total_log_moments: Sequence[float], moments: Sequence[float], delta: float
) -> tuple[float, float]:
    """(eps, moment): eps = min_l (total alpha(l) - ln delta) / l (2017, Theorem 1 tail bound)."""
    _check_delta(delta)
    moments = np.asarray(moments, dtype=np.float64)
    totals = np.asarray(total_log_moments, dtype=np.float64)
    eps = (totals - math.log(delta)) / moments
    best = int(np.argmin(eps))
    return float(eps[best]), float(moments[best])


def lnmax_eps_data_independent(
    num_queries: int,
    gamma: float,
    delta: float,
    moments: Sequence[float] = DEFAULT_MOMENTS,
) -> PrivacySpent:
    """(eps, delta) of ``num_queries`` LNMax answers, whatever the votes were."""
    _check_num_queries(num_queries)
    moments = _check_moments(moments)
    totals = [num_queries * lnmax_log_moment_data_independent(gamma, m) for m in moments]
    eps, best = moments_to_dp(totals, moments, delta)
    return PrivacySpent(eps, delta, best, num_queries, num_queries)


def lnmax_eps_data_dependent(
    counts: object,
    gamma: float,
    delta: float,
    moments: Sequence[float] = DEFAULT_MOMENTS,
) -> PrivacySpent:
    """(eps, delta) of LNMax answers to the queries whose vote counts are the rows of ``counts``.

    Never larger than ``lnmax_eps_data_independent`` for as many queries, since each
    query's log moment is the minimum of the two bounds.
    """
    _check_gamma(gamma)
    moments = _check_moments(moments)
    votes = _as_counts(counts)
    totals = np.zeros(len(moments))
    for row in votes:
        q = lnmax_q_bound(row, gamma)
        totals += [lnmax_log_moment_data_dependent(q, gamma, m) for m in moments]
    eps, best = moments_to_dp(totals, moments, delta)
    return PrivacySpent(eps, delta, best, len(votes), len(votes))


# GNMax and Confident-GNMax: Renyi DP (Papernot et al. 2018)


def gnmax_rdp_data_independent(sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one GNMax answer at each order: lambda / sigma^2 (2018, Proposition 8).

    One teacher changing its vote moves two counts by one each: L2 sensitivity sqrt(2),
    and the Gaussian mechanism's RDP is lambda * sensitivity^2 / (2 sigma^2).
    """
    _check_sigma(sigma, "sigma")
    return _check_orders(orders) / sigma**2


def threshold_rdp_data_independent(sigma1: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of Confident-GNMax's threshold check at each order: lambda / (2 sigma1^2).

    The check releases whether max_j n_j + N(0, sigma1^2) >= T. One teacher changing its
    vote moves the top count by at most one, so this is a Gaussian mechanism of
    sensitivity 1, with half the RDP of GNMax at the same sigma. This is also what the
    2018 paper's reference code charges (GNMax's RDP at sigma * sqrt(2)).
    """
    _check_sigma(sigma1, "sigma1")
    return _check_orders(orders) / (2 * sigma1**2)


def gnmax_log_q_bound(votes: Sequence[float] | np.ndarray, sigma: float) -> float:
    """Natural log of an upper bound on Pr[GNMax does not return the plurality label].

    q <= sum_{j != j*} Pr[N(0, 2 sigma^2) > n_{j*} - n_j]
       = sum_{j != j*} erfc((n_{j*} - n_j) / (2 sigma)) / 2        (2018, Proposition 7),
    capped at 1 - 1/classes: with i.i.d. noise the plurality label is the likeliest
    answer, so it comes out with probability at least 1/classes. Computed in log space
    so a large margin gives a very negative log q rather than log(0).
    """
    _check_sigma(sigma, "sigma")
    votes = _as_vote_vector(votes)
    gaps = votes.max() - np.delete(votes, int(np.argmax(votes)))
    if gaps.size == 0:
        return -math.inf  # one class: the answer is fixed
    log_terms = [_log_half_erfc(gap / (2 * sigma)) for gap in gaps]
    log_q = float(np.logaddexp.reduce(log_terms))
    return min(log_q, math.log1p(-1.0 / votes.size))


def gnmax_rdp_data_dependent(log_q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """Data-dependent RDP of one GNMax answer, given log q >= log Pr[answer != plurality].

    Papernot et al. 2018, Theorem 6, with the mechanism's own data-independent RDP at
    two higher orders mu1 and mu2 (epsilon_i = mu_i / sigma^2) and the choice of
    Appendix B: mu2 = sigma sqrt(ln(1/q)), mu1 = mu2 + 1. For orders lambda < mu1:

        RDP(lambda) <= log((1 - q) A^{lambda-1} + q B^{lambda-1}) / (lambda - 1),
        A = (1 - q) / (1 - (q e^{eps2})^{(mu2-1)/mu2}),  B = e^{eps1} / q^{1/(mu1-1)},

    used only when mu2 > 1, q e^{eps2} < 1 (A is finite and positive) and the theorem's
    condition q <= e^{(mu2-1) eps2} / (mu1/(mu1-1) * mu2/(mu2-1))^mu2 holds, and never
    above the data-independent lambda / sigma^2, which is returned wherever the
    data-dependent bound does not apply. The checks follow the paper's reference code.
    """
    rdp = gnmax_rdp_data_independent(sigma, orders)
    if not (log_q <= 0):
        raise GauntletError(f"log q must be <= 0, but got {log_q}")
    if sigma == 0:
        raise GauntletError("sigma must be > 0 to bound the privacy cost of GNMax")
    if log_q == -math.inf:
        return np.zeros_like(rdp)  # the answer is fixed: nothing is revealed
    orders = np.asarray(orders, dtype=np.float64)
    variance = sigma**2
    mu2 = sigma * math.sqrt(-log_q)
    mu1 = mu2 + 1
    eps1, eps2 = mu1 / variance, mu2 / variance
    applies = orders < mu1
    if mu2 <= 1 or not applies.any() or -log_q <= eps2:
        return rdp
    condition = (mu2 - 1) * eps2 - mu2 * (math.log1p(1 / (mu1 - 1)) + math.log1p(1 / (mu2 - 1)))
    if log_q > condition:
        return rdp
    log1mq = _log1mexp(log_q)
    log_a = log1mq - _log1mexp((log_q + eps2) * (1 - 1 / mu2))
    log_b = eps1 - log_q / (mu1 - 1)
    power = orders[applies] - 1
    log_s = np.logaddexp(log1mq + power * log_a, log_q + power * log_b)
    rdp[applies] = np.minimum(rdp[applies], log_s / power)
    return rdp


def rdp_to_dp(
    total_rdp: Sequence[float], orders: Sequence[float], delta: float
) -> tuple[float, float]:
    """(eps, order): eps = min_lambda (RDP(lambda) + ln(1/delta) / (lambda - 1)).

    The standard conversion (Mironov 2017, Proposition 3), as in the 2018 paper; the
    minimum is over the given grid, so a coarse grid overstates eps slightly.
    """
    _check_delta(delta)
    orders = _check_orders(orders)
    totals = np.asarray(total_rdp, dtype=np.float64)
    if totals.shape != orders.shape:
        raise GauntletError(
            f"Expected {orders.size} RDP values (one per order), got {totals.shape}"
        )
    eps = totals + math.log(1 / delta) / (orders - 1)
    best = int(np.argmin(eps))
    return float(eps[best]), float(orders[best])


def gnmax_eps_data_independent(
    num_queries: int,
    sigma: float,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> PrivacySpent:
    """(eps, delta) of ``num_queries`` GNMax answers, whatever the votes were."""
    _check_num_queries(num_queries)
    _check_positive_sigma(sigma, "sigma")
    eps, best = rdp_to_dp(num_queries * gnmax_rdp_data_independent(sigma, orders), orders, delta)
    return PrivacySpent(eps, delta, best, num_queries, num_queries)


def gnmax_eps_data_dependent(
    counts: object,
    sigma: float,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> PrivacySpent:
    """(eps, delta) of GNMax answers to the queries whose vote counts are the rows of ``counts``."""
    _check_positive_sigma(sigma, "sigma")
    votes = _as_counts(counts)
    total = _gnmax_rdp_total(votes, sigma, _check_orders(orders))
    eps, best = rdp_to_dp(total, orders, delta)
    return PrivacySpent(eps, delta, best, len(votes), len(votes))


def confident_gnmax_eps(
    counts: object,
    answered: object,
    sigma1: float,
    sigma2: float,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
    data_dependent: bool = True,
) -> PrivacySpent:
    """(eps, delta) of Confident-GNMax over the queries whose vote counts are ``counts``.

    Every query pays for the threshold check (``threshold_rdp_data_independent``), since
    refusing is itself an answer; only the ``answered`` ones also pay for GNMax at
    ``sigma2``, data-dependent (``gnmax_rdp_data_dependent``) unless ``data_dependent``
    is False. The threshold check is always charged its data-independent cost: the
    2018 paper's data-dependent bound for it is not implemented.
    """
    _check_positive_sigma(sigma1, "sigma1")
    _check_positive_sigma(sigma2, "sigma2")
    votes = _as_counts(counts)
    mask = np.asarray(_to_numpy(answered))
    if mask.dtype != bool or mask.shape != (len(votes),):
        raise GauntletError(
            f"answered must be a boolean vector of {len(votes)} entries (one per query), "
            f"but got dtype {mask.dtype} and shape {mask.shape}"
        )
    grid = _check_orders(orders)
    total = len(votes) * threshold_rdp_data_independent(sigma1, grid)
    if data_dependent:
        total = total + _gnmax_rdp_total(votes[mask], sigma2, grid)
    else:
        total = total + int(mask.sum()) * gnmax_rdp_data_independent(sigma2, grid)
    eps, best = rdp_to_dp(total, grid, delta)
    return PrivacySpent(eps, delta, best, len(votes), int(mask.sum()))


def _gnmax_rdp_total(votes: np.ndarray, sigma: float, orders: np.ndarray) -> np.ndarray:
    total = np.zeros_like(orders)
    for row in votes:
        total += gnmax_rdp_data_dependent(gnmax_log_q_bound(row, sigma), sigma, orders)
    return total


# Numerics


# Above this, erfc underflows soon (near 26.5 in float64): switch to its asymptotic series.
_ERFC_SERIES_FROM = 25.0


def _log_half_erfc(x: float) -> float:
    """log(erfc(x) / 2) for x >= 0, without underflow for large x."""
    if x < _ERFC_SERIES_FROM:
        return math.log(0.5 * math.erfc(x))
    # erfc(x) = e^{-x^2} / (x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6) + ...);
    # the next term, 105/(16x^8), is below 1e-10 relative from x = 25 on.
    inv = 1.0 / (x * x)
    series = 1.0 - inv / 2 + 3 * inv**2 / 4 - 15 * inv**3 / 8
    return math.log(0.5) - x * x - math.log(x * math.sqrt(math.pi)) + math.log(series)


def _log1mexp(x: float) -> float:
    """log(1 - e^x) for x < 0, accurate both near 0 and for very negative x."""
    if x > -math.log(2):
        return math.log(-math.expm1(x))
    return math.log1p(-math.exp(x))


# Validation


def _to_numpy(values: object) -> object:
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return values


def _as_counts(counts: object) -> np.ndarray:
    array = np.asarray(_to_numpy(counts))
    if array.ndim != 2 or array.shape[1] < 1:
        raise GauntletError(
            "Vote counts must be 2-D (queries, classes) with at least one class, "
            f"but got shape {array.shape}"
        )
    return _checked_votes(array)


def _as_vote_vector(votes: object) -> np.ndarray:
    array = np.asarray(_to_numpy(votes))
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


def _check_gamma(gamma: float) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise GauntletError(f"gamma must be a number, but got {gamma!r}")
    if not math.isfinite(gamma) or gamma <= 0:
        raise GauntletError(
            f"gamma must be finite and > 0 to account for LNMax (no noise has no DP), got {gamma}"
        )


def _check_sigma(sigma: float, name: str) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise GauntletError(f"{name} must be a number, but got {sigma!r}")
    if not math.isfinite(sigma) or sigma < 0:
        raise GauntletError(f"{name} must be finite and >= 0, but got {sigma}")


def _check_positive_sigma(sigma: float, name: str) -> None:
    _check_sigma(sigma, name)
    if sigma == 0:
        raise GauntletError(f"{name} must be > 0 to account for it (no noise has no DP)")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise GauntletError(f"delta must lie in (0, 1), but got {delta!r}")


def _check_num_queries(num_queries: int) -> None:
    if (
        isinstance(num_queries, bool)
        or not isinstance(num_queries, numbers.Integral)
        or num_queries < 0
    ):
        raise GauntletError(f"num_queries must be an integer >= 0, but got {num_queries!r}")


def _check_moment(moment: float) -> None:
    if isinstance(moment, bool) or not isinstance(moment, numbers.Real):
        raise GauntletError(f"A moment must be a number, but got {moment!r}")
    if not math.isfinite(moment) or moment <= 0:
        raise GauntletError(f"Moments must be finite and > 0, but got {moment}")


def _check_moments(moments: Sequence[float]) -> list[float]:
    values = list(moments)
    if not values:
        raise GauntletError("At least one moment is needed")
    for moment in values:
        _check_moment(moment)
    return values


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    array = np.asarray(orders, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise GauntletError(f"RDP orders must be a non-empty vector, but got shape {array.shape}")
    if not np.all(np.isfinite(array)) or array.min() <= 1:
        raise GauntletError("RDP orders must be finite and > 1")
    return array
