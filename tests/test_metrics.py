"""Attack metrics against hand-computed values and the Wilson interval's closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from gauntlet.workers.attacks import AttackResult, Clean
from gauntlet.workers.attacks.metrics import attack_metrics
from gauntlet.workers.results import Z_95, wilson_interval


def wilson_by_quadratic(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The interval's endpoints as the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    phat = k / n
    a = 1 + z * z / n
    b = -(2 * phat + z * z / n)
    c = phat * phat
    root = math.sqrt(b * b - 4 * a * c)
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


@pytest.mark.parametrize(("k", "n"), [(1, 3), (8, 10), (37, 50), (450, 1000), (999, 1000)])
def test_wilson_matches_the_closed_form(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson_by_quadratic(k, n), abs=1e-12)


def test_wilson_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def by_name(metrics):
    return {m.name: m for m in metrics}


def hand_built() -> tuple[torch.Tensor, AttackResult]:
    """Ten 1x2x2 images of constant 0.5 (||x||_2 = 1) with chosen outcomes.

    Clean-correct: 0..7. Robust: 0, 1, 2 (and 9, which the model gets wrong: must not
    count). Fooled: 3..7, perturbed by L2 norms 0.1, 0.2, 0.3, 0.4, 0.5.
    """
    x = torch.full((10, 1, 2, 2), 0.5)
    x_adv = x.clone()
    for i, size in zip(range(3, 8), [0.1, 0.2, 0.3, 0.4, 0.5], strict=True):
        x_adv[i, 0, 0, 0] += size  # one pixel: the L2 norm of the change is `size`
    x_adv[0] += 0.25  # a robust point's perturbation says nothing about successes
    x_adv[9] = 0.0  # nor does a clean-wrong point's
    clean = torch.tensor([True] * 8 + [False] * 2)
    robust = torch.tensor([True] * 3 + [False] * 6 + [True])
    return x, AttackResult(x_adv, clean, robust, grad_evals=0)


def test_accuracies_with_intervals():
    x, result = hand_built()
    metrics = by_name(attack_metrics(x, result))
    clean = metrics["clean_accuracy"]
    assert (clean.value, clean.n) == (0.8, 10)
    assert (clean.low, clean.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    robust = metrics["robust_accuracy"]
    assert (robust.value, robust.n) == (0.3, 10)
    assert (robust.low, robust.high) == pytest.approx(wilson_interval(3, 10))


def test_success_rate_counts_only_attacked_points():
    x, result = hand_built()
    rate = by_name(attack_metrics(x, result))["success_rate"]
    assert (rate.value, rate.n) == (5 / 8, 8)
    assert (rate.low, rate.high) == pytest.approx(wilson_interval(5, 8))


def test_mean_normalised_l2_over_successes_only():
    x, result = hand_built()
    l2 = by_name(attack_metrics(x, result))["mean_normalised_l2"]
    assert l2.value == pytest.approx(0.3, abs=1e-6)  # mean of 0.1 .. 0.5 over ||x|| = 1
    assert (l2.n, l2.low, l2.high) == (5, None, None)
    # Doubling the images' brightness halves the normalised distance.
    result.x_adv[3:8] += 0.5
    l2 = by_name(attack_metrics(x + 0.5, result))["mean_normalised_l2"]
    assert l2.value == pytest.approx(0.15, abs=1e-6)


def test_no_successes_and_black_images():
    x, result = hand_built()
    result.robust[:8] = True
    metrics = by_name(attack_metrics(x, result))
    assert (metrics["success_rate"].value, metrics["success_rate"].n) == (0.0, 8)
    assert (metrics["mean_normalised_l2"].value, metrics["mean_normalised_l2"].n) == (0.0, 0)
    # An all-black image has no normalised distance: left out, not infinity.
    x, result = hand_built()
    x[3] = 0.0
    result.x_adv[3] = 0.1
    l2 = by_name(attack_metrics(x, result))["mean_normalised_l2"]
    assert (l2.value, l2.n) == (pytest.approx((0.2 + 0.3 + 0.4 + 0.5) / 4), 4)


def test_nothing_attacked():
    x = torch.full((4, 1, 2, 2), 0.5)
    none = torch.zeros(4, dtype=torch.bool)
    metrics = by_name(attack_metrics(x, AttackResult(x, none, none, 0)))
    assert metrics["clean_accuracy"].value == 0.0
    assert (metrics["success_rate"].value, metrics["success_rate"].n) == (0.0, 0)
    assert (metrics["success_rate"].low, metrics["success_rate"].high) == (0.0, 1.0)


def test_clean_attack_metrics_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(20, 1, 2, 2)
    y = torch.randint(0, 3, (20,))
    result = Clean()(model, x, y, None)
    metrics = by_name(attack_metrics(x, result))
    k = int((model(x).argmax(1) == y).sum())
    assert metrics["clean_accuracy"].value == metrics["robust_accuracy"].value == k / 20
    assert metrics["success_rate"].value == 0.0 and metrics["success_rate"].n == k


def test_mismatched_sizes():
    x, result = hand_built()
    with pytest.raises(ValueError, match="Expected 10 inputs"):
        attack_metrics(x[:5], result)
