"""LNMax privacy accounting: the moments accountant of Papernot et al. 2017.

arXiv 1610.05755, Section 3 and Appendix: log moments alpha(l) summed over queries,
then eps = min_l (sum alpha(l) - ln delta) / l over the integer moments l = 1..8.
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
    check_gamma,
    check_moment,
    check_moments,
    check_num_queries,
)
from gauntlet.workers.privacy.spent import PrivacySpent, best_on_grid

__all__ = [
    "DEFAULT_MOMENTS",
    "lnmax_eps_data_dependent",
    "lnmax_eps_data_independent",
    "lnmax_log_moment_data_dependent",
    "lnmax_log_moment_data_independent",
    "lnmax_q_bound",
    "moments_to_dp",
]

# The 2017 paper's accountant tracks the integer moments l = 1..8 (its reference code's
# default). The grid matters: the unanimous-votes reference value (eps = 1.442) is
# reached at l = 8, the edge of the grid, and more moments would give a smaller eps.
DEFAULT_MOMENTS: tuple[int, ...] = tuple(range(1, 9))


def lnmax_log_moment_data_independent(gamma: float, moment: float) -> float:
    """Per-query bound on the l-th log moment of LNMax: min(2 gamma^2 l (l+1), 2 gamma l).

    LNMax is (2 gamma, 0)-DP; the first term is the paper's Theorem 2 bound for a pure
    eps-DP mechanism with eps = 2 gamma, the second the trivial eps * l.
    """
    check_gamma(gamma, accounting=True)
    check_moment(moment)
    return min(2.0 * gamma * gamma * moment * (moment + 1), 2.0 * gamma * moment)


def lnmax_q_bound(votes: Sequence[float] | np.ndarray, gamma: float) -> float:
    """Upper bound on Pr[LNMax does not return the plurality label] for one query.

    q <= sum_{j != j*} (2 + gamma Delta_j) / (4 exp(gamma Delta_j)), Delta_j = n_{j*} - n_j
    (Papernot et al. 2017, Appendix): a union bound over the classes that could beat
    the winner j*. Each term is exactly the probability that the difference of two
    Lap(1/gamma) variables exceeds Delta_j.
    """
    check_gamma(gamma, accounting=True)
    votes = as_vote_vector(votes)
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
    check_delta(delta)
    moments = np.asarray(moments, dtype=np.float64)
    totals = np.asarray(total_log_moments, dtype=np.float64)
    eps = (totals - math.log(delta)) / moments
    return best_on_grid(eps, moments)


def lnmax_eps_data_independent(
    num_queries: int, gamma: float, delta: float, moments: Sequence[float] = DEFAULT_MOMENTS
) -> PrivacySpent:
    """(eps, delta) of ``num_queries`` LNMax answers, whatever the votes were."""
    check_num_queries(num_queries)
    moments = check_moments(moments)
    totals = [num_queries * lnmax_log_moment_data_independent(gamma, m) for m in moments]
    return _spent(totals, moments, delta, num_queries)


def lnmax_eps_data_dependent(
    counts: object, gamma: float, delta: float, moments: Sequence[float] = DEFAULT_MOMENTS
) -> PrivacySpent:
    """(eps, delta) of LNMax answers to the queries whose vote counts are the rows of ``counts``.

    Never larger than ``lnmax_eps_data_independent`` for as many queries, since each
    query's log moment is the minimum of the two bounds.
    """
    check_gamma(gamma, accounting=True)
    moments = check_moments(moments)
    votes = as_counts(counts)
    totals = np.zeros(len(moments))
    for row in votes:
        q = lnmax_q_bound(row, gamma)
        totals += [lnmax_log_moment_data_dependent(q, gamma, m) for m in moments]
    return _spent(totals, moments, delta, len(votes))


def _spent(
    totals: Sequence[float], moments: Sequence[float], delta: float, queries: int
) -> PrivacySpent:
    eps, best = moments_to_dp(totals, moments, delta)
    return PrivacySpent(eps, delta, best, queries, queries)
