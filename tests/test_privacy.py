"""PATE privacy accounting against the reference values, closed forms and exact divergences.

Reference values (REFERENCES.md, "PATE"): LNMax at gamma = 0.05, delta = 1e-5 over 100
queries costs eps = 5.303 data-independently and eps = 1.442 on unanimous votes of 250
teachers; GNMax at sigma = 40 over 640 queries costs eps = 4.693 on the order grid
2, 2.5, ... (4.692 at the continuous optimum).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.privacy.aggregation import vote_counts
from gauntlet.workers.privacy.gnmax_accounting import (
    DEFAULT_ORDERS,
    confident_gnmax_eps,
    gnmax_eps_data_dependent,
    gnmax_eps_data_independent,
    gnmax_log_q_bound,
    gnmax_rdp_data_dependent,
    gnmax_rdp_data_independent,
    rdp_orders,
    rdp_to_dp,
    threshold_rdp_data_independent,
)
from gauntlet.workers.privacy.lnmax_accounting import (
    DEFAULT_MOMENTS,
    lnmax_eps_data_dependent,
    lnmax_eps_data_independent,
    lnmax_log_moment_data_dependent,
    lnmax_log_moment_data_independent,
    lnmax_q_bound,
)
from gauntlet.workers.privacy.spent import PrivacySpent

DELTA = 1e-5


def unanimous(queries: int, teachers: int = 250, classes: int = 10) -> np.ndarray:
    counts = np.zeros((queries, classes), dtype=np.int64)
    counts[:, 0] = teachers
    return counts


def random_counts(seed: int, queries: int = 200, teachers: int = 250, classes: int = 10):
    """Votes from teachers of varying accuracy, so margins range from ties to unanimity."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, queries)
    accuracy = rng.uniform(0.1, 1.0, queries)
    right = rng.random((teachers, queries)) < accuracy
    labels = np.where(right, truth, rng.integers(0, classes, (teachers, queries)))
    return vote_counts(torch.from_numpy(labels), classes).numpy()


# Reference values


def test_lnmax_data_independent_reference():
    spent = lnmax_eps_data_independent(100, gamma=0.05, delta=DELTA)
    assert spent.eps == pytest.approx(5.303, abs=1e-3)
    assert spent == PrivacySpent(spent.eps, DELTA, 5.0, 100, 100)


def test_lnmax_data_independent_closed_form():
    # For gamma l < 1 the per-query moment is 2 gamma^2 l (l + 1); over k queries
    # eps(l) = 2 k gamma^2 (l + 1) + ln(1/delta) / l.
    for gamma, k in [(0.05, 100), (0.02, 1000), (0.1, 10)]:
        expected = min(
            2 * k * gamma**2 * (m + 1) + math.log(1 / DELTA) / m for m in DEFAULT_MOMENTS
        )
        assert lnmax_eps_data_independent(k, gamma, DELTA).eps == pytest.approx(expected, rel=1e-12)


def test_lnmax_data_dependent_reference_on_unanimous_votes():
    spent = lnmax_eps_data_dependent(unanimous(100), gamma=0.05, delta=DELTA)
    assert spent.eps == pytest.approx(1.442, abs=1e-3)
    # The optimum sits at the last of the integer moments 1..8.
    assert spent.order == 8.0 and spent.queries == 100


def test_gnmax_data_independent_reference():
    spent = gnmax_eps_data_independent(640, sigma=40, delta=DELTA)
    assert spent.eps == pytest.approx(4.693, abs=1e-3)
    assert spent.order == 6.5
    # Continuous optimum of 640 a / 40^2 + ln(1/delta) / (a - 1): a = 1 + sqrt(ln(1/delta) / r).
    rate = 640 / 40**2
    best = 1 + math.sqrt(math.log(1 / DELTA) / rate)
    continuous = rate * best + math.log(1 / DELTA) / (best - 1)
    assert continuous == pytest.approx(4.692, abs=1e-3)
    assert continuous <= spent.eps < continuous + 2e-3


def test_default_order_grid():
    assert DEFAULT_ORDERS[:3] == (2.0, 2.5, 3.0)
    assert DEFAULT_ORDERS[-1] == 500.0
    assert np.allclose(np.diff(DEFAULT_ORDERS), 0.5)
    assert rdp_orders(2, 1, 4) == (2.0, 3.0, 4.0)


# LNMax bounds


def test_lnmax_q_bound_formula():
    votes = np.array([10, 7, 10, 0])
    gamma = 0.5
    terms = [(2 + gamma * d) / (4 * math.exp(gamma * d)) for d in (3, 0, 10)]
    assert lnmax_q_bound(votes, gamma) == pytest.approx(sum(terms), rel=1e-12)


def test_lnmax_data_dependent_falls_back_when_the_condition_fails():
    gamma = 0.05
    limit = (math.exp(2 * gamma) - 1) / (math.exp(4 * gamma) - 1)
    for moment in DEFAULT_MOMENTS:
        independent = lnmax_log_moment_data_independent(gamma, moment)
        assert lnmax_log_moment_data_dependent(limit, gamma, moment) == independent
        assert lnmax_log_moment_data_dependent(0.9, gamma, moment) == independent
        assert lnmax_log_moment_data_dependent(0.0, gamma, moment) == 0.0


def lnmax_two_class_error(gap: float, gamma: float) -> float:
    """Exact Pr[LNMax picks the loser] with two classes and margin ``gap``."""
    if gap < 0:
        return 1 - lnmax_two_class_error(-gap, gamma)
    return (2 + gamma * gap) / (4 * math.exp(gamma * gap))


@pytest.mark.parametrize("gap", [4, 10, 30, 80])
def test_lnmax_data_dependent_moment_bounds_the_exact_two_class_moment(gap):
    # Two classes: the output is Bernoulli and one teacher moves the margin by at most 2,
    # so the exact log moment log E[(P(o|d) / P(o|d'))^l] can be computed and must not
    # exceed Theorem 3's bound.
    gamma = 0.1
    q = lnmax_two_class_error(gap, gamma)
    assert lnmax_q_bound([50 + gap, 50], gamma) == pytest.approx(q, rel=1e-12)
    tighter = False
    for moment in DEFAULT_MOMENTS:
        bound = lnmax_log_moment_data_dependent(q, gamma, moment)
        tighter |= bound < lnmax_log_moment_data_independent(gamma, moment)
        for shift in (-2, -1, 1, 2):
            q2 = lnmax_two_class_error(gap + shift, gamma)
            exact = math.log((1 - q) * ((1 - q) / (1 - q2)) ** moment + q * (q / q2) ** moment)
            assert exact <= bound + 1e-12
    assert tighter  # the data-dependent bound is in play, not only the fallback


def test_lnmax_data_dependent_never_exceeds_data_independent():
    for seed in range(3):
        counts = random_counts(seed)
        for gamma in (0.02, 0.05, 0.2):
            dependent = lnmax_eps_data_dependent(counts, gamma, DELTA).eps
            independent = lnmax_eps_data_independent(len(counts), gamma, DELTA).eps
            assert dependent <= independent + 1e-12


def test_lnmax_data_dependent_on_ties_is_data_independent():
    counts = np.full((50, 10), 25)
    assert lnmax_eps_data_dependent(counts, 0.05, DELTA).eps == pytest.approx(
        lnmax_eps_data_independent(50, 0.05, DELTA).eps, rel=1e-12
    )


# GNMax bounds


def test_gnmax_log_q_bound_formula():
    votes = np.array([3, 100, 60, 99])
    sigma = 20.0
    expected = sum(0.5 * math.erfc(d / (2 * sigma)) for d in (97, 40, 1))
    assert math.exp(gnmax_log_q_bound(votes, sigma)) == pytest.approx(expected, rel=1e-12)


def test_gnmax_log_q_bound_is_capped_and_survives_huge_margins():
    assert gnmax_log_q_bound([5, 5, 5, 5], 10.0) == pytest.approx(math.log(0.75))
    # erfc underflows past ~26.5; the log-space series continues it smoothly.
    below = gnmax_log_q_bound([2 * 24.99, 0], 1.0)
    above = gnmax_log_q_bound([2 * 25.0, 0], 1.0)
    assert above == pytest.approx(math.log(0.5 * math.erfc(25.0)), rel=1e-9)
    assert above < below < above + 1.0
    huge = gnmax_log_q_bound([2000, 0], 1.0)
    assert math.isfinite(huge) and huge < -1e6
    assert gnmax_log_q_bound([7], 1.0) == -math.inf


def theorem6_plain(q: float, sigma: float, order: float) -> float:
    """Theorem 6 of Papernot et al. 2018 evaluated directly, without log-space tricks."""
    mu2 = sigma * math.sqrt(math.log(1 / q))
    mu1 = mu2 + 1
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    a = (1 - q) / (1 - (q * math.exp(eps2)) ** ((mu2 - 1) / mu2))
    b = math.exp(eps1) / q ** (1 / (mu1 - 1))
    return math.log((1 - q) * a ** (order - 1) + q * b ** (order - 1)) / (order - 1)


def test_gnmax_data_dependent_matches_theorem_6():
    sigma, q = 40.0, 1e-6
    orders = np.array([2.0, 5.0, 10.0, 30.0])
    rdp = gnmax_rdp_data_dependent(math.log(q), sigma, orders)
    expected = [min(theorem6_plain(q, sigma, o), o / sigma**2) for o in orders]
    assert rdp == pytest.approx(expected, rel=1e-9)
    assert np.all(rdp < gnmax_rdp_data_independent(sigma, orders))
    # Orders at or above mu1 = sigma sqrt(ln(1/q)) + 1 (~ 150) fall back.
    high = np.array([200.0, 400.0])
    assert gnmax_rdp_data_dependent(math.log(q), sigma, high) == pytest.approx(high / sigma**2)


def gnmax_two_class_error(gap: float, sigma: float) -> float:
    return 0.5 * math.erfc(gap / (2 * sigma))


@pytest.mark.parametrize(("gap", "sigma"), [(60, 10.0), (150, 20.0), (200, 40.0), (400, 40.0)])
def test_gnmax_data_dependent_rdp_bounds_the_exact_two_class_divergence(gap, sigma):
    # Two classes: the union bound is exact, the output is Bernoulli and a neighbour's
    # margin is gap + {-2, ..., 2}; the exact Renyi divergence must stay under the bound.
    q = gnmax_two_class_error(gap, sigma)
    log_q = gnmax_log_q_bound([100 + gap, 100], sigma)
    assert math.exp(log_q) == pytest.approx(q, rel=1e-9)
    orders = np.array(DEFAULT_ORDERS[:80])
    bound = gnmax_rdp_data_dependent(log_q, sigma, orders)
    independent = gnmax_rdp_data_independent(sigma, orders)
    assert np.all(bound <= independent) and np.any(bound < independent)
    for shift in (-2, -1, 1, 2):
        q2 = gnmax_two_class_error(gap + shift, sigma)
        for order, limit in zip(orders, bound, strict=True):
            log_total = np.logaddexp(
                order * math.log1p(-q) + (1 - order) * math.log1p(-q2),
                order * math.log(q) + (1 - order) * math.log(q2),
            )
            assert log_total / (order - 1) <= limit + 1e-12


def test_gnmax_data_dependent_never_exceeds_data_independent():
    for seed in range(3):
        counts = random_counts(seed)
        for sigma in (5.0, 20.0, 40.0):
            per_query = [
                gnmax_rdp_data_dependent(gnmax_log_q_bound(row, sigma), sigma, DEFAULT_ORDERS)
                for row in counts
            ]
            assert np.all(np.array(per_query) <= gnmax_rdp_data_independent(sigma, DEFAULT_ORDERS))
            dependent = gnmax_eps_data_dependent(counts, sigma, DELTA).eps
            assert dependent <= gnmax_eps_data_independent(len(counts), sigma, DELTA).eps + 1e-12


def test_gnmax_data_dependent_is_much_lower_on_unanimous_votes():
    dependent = gnmax_eps_data_dependent(unanimous(640), sigma=40, delta=DELTA)
    independent = gnmax_eps_data_independent(640, sigma=40, delta=DELTA)
    assert dependent.eps < independent.eps / 5
    assert dependent.queries == 640


def test_gnmax_data_dependent_accepts_torch_counts():
    counts = random_counts(0)
    assert gnmax_eps_data_dependent(torch.from_numpy(counts), 20, DELTA) == (
        gnmax_eps_data_dependent(counts, 20, DELTA)
    )


def test_rdp_to_dp_picks_the_best_order():
    orders = [2.0, 3.0, 4.0]
    eps, order = rdp_to_dp([0.1, 0.2, 5.0], orders, 0.1)
    candidates = [r + math.log(10) / (o - 1) for r, o in zip([0.1, 0.2, 5.0], orders, strict=True)]
    assert eps == pytest.approx(min(candidates)) and order == 3.0


# Confident-GNMax


def test_confident_gnmax_charges_the_threshold_for_every_query():
    counts = unanimous(300)
    answered = np.zeros(300, dtype=bool)
    answered[:100] = True
    sigma1, sigma2 = 150.0, 40.0
    spent = confident_gnmax_eps(counts, answered, sigma1, sigma2, DELTA, data_dependent=False)
    orders = np.array(DEFAULT_ORDERS)
    total = 300 * orders / (2 * sigma1**2) + 100 * orders / sigma2**2
    expected = np.min(total + math.log(1 / DELTA) / (orders - 1))
    assert spent.eps == pytest.approx(expected, rel=1e-12)
    assert (spent.queries, spent.answered) == (300, 100)
    assert np.allclose(threshold_rdp_data_independent(sigma1, orders), orders / (2 * sigma1**2))


def test_confident_gnmax_refusals_cost_less_than_answers():
    counts = random_counts(4, queries=300)
    none = np.zeros(300, dtype=bool)
    every = np.ones(300, dtype=bool)
    refused = confident_gnmax_eps(counts, none, 150, 40, DELTA)
    answered = confident_gnmax_eps(counts, every, 150, 40, DELTA)
    independent = confident_gnmax_eps(counts, every, 150, 40, DELTA, data_dependent=False)
    assert 0 < refused.eps < answered.eps <= independent.eps
    # Answering unanimous queries costs far less than their data-independent price.
    consensus = confident_gnmax_eps(unanimous(300), every, 150, 40, DELTA)
    assert consensus.eps < 0.5 * independent.eps


# Validation


@pytest.mark.parametrize(
    "call",
    [
        lambda: lnmax_eps_data_independent(100, 0.0, DELTA),
        lambda: lnmax_eps_data_independent(100, math.inf, DELTA),
        lambda: lnmax_eps_data_independent(-1, 0.05, DELTA),
        lambda: lnmax_eps_data_independent(100, 0.05, 0.0),
        lambda: lnmax_eps_data_independent(100, 0.05, 1.0),
        lambda: lnmax_eps_data_independent(100, 0.05, DELTA, moments=[]),
        lambda: lnmax_eps_data_independent(100, 0.05, DELTA, moments=[0, 1]),
        lambda: lnmax_eps_data_dependent(np.ones(10), 0.05, DELTA),
        lambda: lnmax_eps_data_dependent(-unanimous(3), 0.05, DELTA),
        lambda: lnmax_log_moment_data_dependent(-0.1, 0.05, 1),
        lambda: gnmax_eps_data_independent(10, 0.0, DELTA),
        lambda: gnmax_eps_data_independent(10, -1.0, DELTA),
        lambda: gnmax_eps_data_independent(10, 40, DELTA, orders=[1.0, 2.0]),
        lambda: gnmax_eps_data_dependent(unanimous(3).astype(str), 40, DELTA),
        lambda: gnmax_eps_data_dependent(unanimous(3), 40, DELTA, orders=[]),
        lambda: gnmax_rdp_data_dependent(0.5, 40, DEFAULT_ORDERS),
        lambda: confident_gnmax_eps(unanimous(3), np.ones(2, dtype=bool), 150, 40, DELTA),
        lambda: confident_gnmax_eps(unanimous(3), np.ones(3), 150, 40, DELTA),
        lambda: confident_gnmax_eps(unanimous(3), np.ones(3, dtype=bool), 0, 40, DELTA),
        lambda: rdp_to_dp([1.0], [2.0, 3.0], DELTA),
        lambda: rdp_orders(1.0, 0.5, 10),
        lambda: rdp_orders(2.0, 0.0, 10),
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(GauntletError):
        call()
