"""GNMax and Confident-GNMax privacy accounting: the Renyi DP analysis of Papernot et al. 2018.

arXiv 1802.08908: RDP of order lambda summed over queries, then
eps = min_lambda (sum RDP(lambda) + ln(1 / delta) / (lambda - 1)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.privacy.checks import (
    as_counts,
    as_vote_vector,
    check_delta,
    check_num_queries,
    check_orders,
    check_positive_sigma,
    check_sigma,
    to_numpy,
)
from gauntlet.workers.privacy.spent import PrivacySpent, best_on_grid

__all__ = [
    "DEFAULT_ORDERS",
    "confident_gnmax_eps",
    "gnmax_eps_data_dependent",
    "gnmax_eps_data_independent",
    "gnmax_log_q_bound",
    "gnmax_rdp_data_dependent",
    "gnmax_rdp_data_independent",
    "rdp_orders",
    "rdp_to_dp",
    "threshold_rdp_data_independent",
]


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


def gnmax_rdp_data_independent(sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one GNMax answer at each order: lambda / sigma^2 (2018, Proposition 8).

    One teacher changing its vote moves two counts by one each: L2 sensitivity sqrt(2),
    and the Gaussian mechanism's RDP is lambda * sensitivity^2 / (2 sigma^2).
    """
    check_sigma(sigma, "sigma")
    return check_orders(orders) / sigma**2


def threshold_rdp_data_independent(sigma1: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of Confident-GNMax's threshold check at each order: lambda / (2 sigma1^2).

    The check releases whether max_j n_j + N(0, sigma1^2) >= T. One teacher changing its
    vote moves the top count by at most one, so this is a Gaussian mechanism of
    sensitivity 1, with half the RDP of GNMax at the same sigma. This is also what the
    2018 paper's reference code charges (GNMax's RDP at sigma * sqrt(2)).
    """
    check_sigma(sigma1, "sigma1")
    return check_orders(orders) / (2 * sigma1**2)


def gnmax_log_q_bound(votes: Sequence[float] | np.ndarray, sigma: float) -> float:
    """Natural log of an upper bound on Pr[GNMax does not return the plurality label].

    q <= sum_{j != j*} Pr[N(0, 2 sigma^2) > n_{j*} - n_j]
       = sum_{j != j*} erfc((n_{j*} - n_j) / (2 sigma)) / 2        (2018, Proposition 7),
    capped at 1 - 1/classes: with i.i.d. noise the plurality label is the likeliest
    answer, so it comes out with probability at least 1/classes. Computed in log space
    so a large margin gives a very negative log q rather than log(0).
    """
    check_sigma(sigma, "sigma")
    votes = as_vote_vector(votes)
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
    check_delta(delta)
    orders = check_orders(orders)
    totals = np.asarray(total_rdp, dtype=np.float64)
    if totals.shape != orders.shape:
        raise GauntletError(
            f"Expected {orders.size} RDP values (one per order), got {totals.shape}"
        )
    eps = totals + math.log(1 / delta) / (orders - 1)
    return best_on_grid(eps, orders)


def gnmax_eps_data_independent(
    num_queries: int, sigma: float, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> PrivacySpent:
    """(eps, delta) of ``num_queries`` GNMax answers, whatever the votes were."""
    check_num_queries(num_queries)
    check_positive_sigma(sigma, "sigma")
    eps, best = rdp_to_dp(num_queries * gnmax_rdp_data_independent(sigma, orders), orders, delta)
    return PrivacySpent(eps, delta, best, num_queries, num_queries)


def gnmax_eps_data_dependent(
    counts: object, sigma: float, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> PrivacySpent:
    """(eps, delta) of GNMax answers to the queries whose vote counts are the rows of ``counts``."""
    check_positive_sigma(sigma, "sigma")
    votes = as_counts(counts)
    total = _gnmax_rdp_total(votes, sigma, check_orders(orders))
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
    check_positive_sigma(sigma1, "sigma1")
    check_positive_sigma(sigma2, "sigma2")
    votes = as_counts(counts)
    mask = np.asarray(to_numpy(answered))
    if mask.dtype != bool or mask.shape != (len(votes),):
        raise GauntletError(
            f"answered must be a boolean vector of {len(votes)} entries (one per query), "
            f"but got dtype {mask.dtype} and shape {mask.shape}"
        )
    grid = check_orders(orders)
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
