"""PATE vote aggregation: exact noise-free behaviour, seeded noise statistics, validation."""

from __future__ import annotations

import math

import pytest
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.privacy.aggregation import (
    confident_gnmax,
    gaussian_noise,
    gnmax,
    laplace_noise,
    lnmax,
    plurality,
    vote_counts,
)


def random_counts(seed: int, queries: int = 500, teachers: int = 25, classes: int = 10):
    generator = torch.Generator().manual_seed(seed)
    predictions = torch.randint(0, classes, (teachers, queries), generator=generator)
    return vote_counts(predictions, classes)


def margin_counts(queries: int, top: int = 200, rest: int = 5, classes: int = 10, label: int = 3):
    counts = torch.full((queries, classes), rest, dtype=torch.long)
    counts[:, label] = top
    return counts


def test_vote_counts_counts_each_teachers_label():
    predictions = torch.tensor([[0, 2, 1], [0, 1, 1], [2, 1, 1], [0, 1, 0]])
    counts = vote_counts(predictions, 3)
    assert counts.tolist() == [[3, 0, 1], [0, 3, 1], [1, 3, 0]]
    assert counts.dtype == torch.long


def test_vote_counts_rows_sum_to_the_number_of_teachers():
    counts = random_counts(0, teachers=37)
    assert counts.shape == (500, 10)
    assert torch.all(counts.sum(dim=1) == 37)


def test_plurality_breaks_ties_toward_the_smallest_label():
    counts = torch.tensor([[1, 3, 3, 0], [2, 2, 2, 2], [0, 0, 0, 5], [0, 4, 1, 4]])
    assert plurality(counts).tolist() == [1, 0, 3, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_off_equals_plurality_exactly(seed):
    counts = random_counts(seed)
    expected = plurality(counts)
    generator = torch.Generator().manual_seed(seed)
    assert torch.equal(lnmax(counts, None, generator), expected)
    assert torch.equal(lnmax(counts, math.inf, generator), expected)
    assert torch.equal(gnmax(counts, 0.0, generator), expected)
    labels, answered = confident_gnmax(counts, 0.0, 0.0, 0.0, generator)
    assert torch.equal(labels, expected) and bool(answered.all())


def test_seeded_aggregation_is_reproducible():
    counts = random_counts(3)
    for aggregate in (lambda g: lnmax(counts, 0.1, g), lambda g: gnmax(counts, 5.0, g)):
        first = aggregate(torch.Generator().manual_seed(7))
        second = aggregate(torch.Generator().manual_seed(7))
        other = aggregate(torch.Generator().manual_seed(8))
        assert torch.equal(first, second)
        assert not torch.equal(first, other)


def test_laplace_noise_has_scale_one_over_gamma():
    generator = torch.Generator().manual_seed(0)
    gamma = 0.05
    noise = laplace_noise((200_000,), gamma, generator)
    # Mean absolute deviation of Lap(b) is b, its standard deviation b: the relative
    # standard error of the estimate is 1/sqrt(n), about 0.2% here.
    assert noise.abs().mean().item() == pytest.approx(1 / gamma, rel=0.02)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.2)
    assert noise.var().item() == pytest.approx(2 / gamma**2, rel=0.03)


def test_gaussian_noise_has_standard_deviation_sigma():
    noise = gaussian_noise((200_000,), 40.0, torch.Generator().manual_seed(0))
    assert noise.std().item() == pytest.approx(40.0, rel=0.01)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.5)


def test_lnmax_two_class_error_rate_is_the_laplace_difference_tail():
    # With two classes LNMax errs exactly when Lap - Lap exceeds the margin, whose tail
    # is (2 + gamma Delta) / (4 exp(gamma Delta)): the q of Papernot et al. 2017.
    gamma, margin, queries = 0.1, 10, 40_000
    counts = torch.tensor([[30, 30 - margin]]).repeat(queries, 1)
    errors = (lnmax(counts, gamma, torch.Generator().manual_seed(1)) != 0).float().mean().item()
    expected = (2 + gamma * margin) / (4 * math.exp(gamma * margin))
    assert errors == pytest.approx(expected, abs=4 * math.sqrt(expected / queries))


def test_gnmax_two_class_error_rate_is_the_gaussian_difference_tail():
    sigma, margin, queries = 10.0, 10, 40_000
    counts = torch.tensor([[30, 30 - margin]]).repeat(queries, 1)
    errors = (gnmax(counts, sigma, torch.Generator().manual_seed(1)) != 0).float().mean().item()
    expected = 0.5 * math.erfc(margin / (2 * sigma))
    assert errors == pytest.approx(expected, abs=4 * math.sqrt(expected / queries))


def test_moderate_noise_keeps_a_large_margin_plurality():
    counts = margin_counts(2000)
    assert (lnmax(counts, 0.05, torch.Generator().manual_seed(0)) == 3).float().mean() > 0.995
    assert (gnmax(counts, 40.0, torch.Generator().manual_seed(0)) == 3).float().mean() > 0.995


@pytest.mark.parametrize("aggregate", ["lnmax", "gnmax"])
def test_huge_noise_is_near_uniform(aggregate):
    queries, classes = 20_000, 10
    counts = margin_counts(queries, classes=classes)
    generator = torch.Generator().manual_seed(0)
    if aggregate == "lnmax":
        labels = lnmax(counts, 1e-6, generator)
    else:
        labels = gnmax(counts, 1e6, generator)
    frequencies = torch.bincount(labels, minlength=classes).double() / queries
    # Each frequency has standard error sqrt(0.09 / 20000) ~ 0.0021: 0.012 is ~6 of them.
    assert torch.all((frequencies - 1 / classes).abs() < 0.012), frequencies


def test_confident_gnmax_answers_consensus_and_refuses_disagreement():
    high = margin_counts(500, top=240, rest=1)  # 250 teachers, 240 agree
    low = torch.full((500, 10), 25, dtype=torch.long)  # 250 teachers, evenly split
    counts = torch.cat([high, low])
    labels, answered = confident_gnmax(
        counts, threshold=150, sigma1=10, sigma2=10, generator=torch.Generator().manual_seed(0)
    )
    assert bool(answered[:500].all()) and not bool(answered[500:].any())
    assert torch.all(labels[:500] == 3)
    assert torch.all(labels[500:] == -1)


def test_confident_gnmax_answer_rate_follows_the_noisy_threshold():
    # Top count 200 against threshold 200 with sigma1 = 50: answered half the time.
    counts = margin_counts(20_000, top=200, rest=5)
    _, answered = confident_gnmax(counts, 200, 50, 40, torch.Generator().manual_seed(2))
    assert answered.double().mean().item() == pytest.approx(0.5, abs=0.015)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: plurality(c.float()),
        lambda c: plurality(c[0]),
        lambda c: plurality(c.bool()),
        lambda c: plurality(-c),
        lambda c: plurality(c.numpy()),
        lambda c: plurality(c[:, :0]),
        lambda c: lnmax(c, 0.0),
        lambda c: lnmax(c, -1.0),
        lambda c: lnmax(c, float("nan")),
        lambda c: gnmax(c, -1.0),
        lambda c: gnmax(c, float("inf")),
        lambda c: gnmax(c, "1"),
        lambda c: confident_gnmax(c, 10, -1.0, 1.0),
        lambda c: confident_gnmax(c, 10, 1.0, -1.0),
        lambda c: confident_gnmax(c, float("nan"), 1.0, 1.0),
        lambda c: laplace_noise((3,), math.inf),
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(GauntletError):
        call(random_counts(0, queries=5))


@pytest.mark.parametrize(
    ("predictions", "classes"),
    [
        (torch.tensor([[0, 3]]), 3),
        (torch.tensor([[0, -1]]), 3),
        (torch.tensor([0, 1]), 3),
        (torch.tensor([[0.0, 1.0]]), 3),
        (torch.tensor([[0, 1]]), 0),
    ],
)
def test_bad_predictions_raise(predictions, classes):
    with pytest.raises(GauntletError):
        vote_counts(predictions, classes)
