"""Teacher vote aggregation for PATE: plurality, LNMax, GNMax and Confident-GNMax.

PATE (Papernot et al. 2017, arXiv 1610.05755; Papernot et al. 2018, arXiv 1802.08908)
trains teachers on disjoint partitions of private data and labels public queries with a
noisy argmax of the teachers' votes, so that no single partition decides a label. Every
function here works on a ``(queries, classes)`` tensor of non-negative integer vote
counts, which ``vote_counts`` builds from the ``(teachers, queries)`` predicted labels.

Noise is drawn from a ``torch.Generator`` (on the counts' device) so that a seeded
aggregation is reproducible; with ``generator=None`` torch's global generator is used.
Noise is added in float64: vote counts are exact there, and float32 rounding of a large
count plus small noise could otherwise create ties that the noise should have broken.

What the answers cost in privacy is computed by ``lnmax_accounting`` and
``gnmax_accounting``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.privacy.checks import (
    NOISE_SIGMA_RANGE,
    check_gamma,
    check_number,
    check_sigma,
)

__all__ = [
    "ConfidentVotes",
    "confident_gnmax",
    "gaussian_noise",
    "gnmax",
    "laplace_noise",
    "lnmax",
    "plurality",
    "vote_counts",
]

Generator = torch.Generator | None
Device = torch.device | str

# A refused Confident-GNMax query gets this label: it is no class, so using it by
# mistake as a training label fails loudly instead of teaching class 0.
REFUSED = -1


class ConfidentVotes(NamedTuple):
    """Confident-GNMax answers: ``labels`` is ``REFUSED`` (-1) wherever ``answered`` is False."""

    labels: torch.Tensor
    answered: torch.Tensor


def vote_counts(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The ``(queries, num_classes)`` int64 vote histogram of ``(teachers, queries)`` labels."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise GauntletError(f"num_classes must be a positive integer, but got {num_classes!r}")
    if not isinstance(predictions, torch.Tensor) or predictions.dim() != 2:
        shape = tuple(predictions.shape) if isinstance(predictions, torch.Tensor) else None
        raise GauntletError(
            f"Teacher predictions must be a 2-D (teachers, queries) tensor, but got shape {shape}"
        )
    if predictions.dtype.is_floating_point or predictions.dtype.is_complex:
        raise GauntletError(f"Teacher predictions must be integer labels, not {predictions.dtype}")
    if predictions.dtype == torch.bool:
        raise GauntletError("Teacher predictions must be integer labels, not booleans")
    if predictions.numel() and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise GauntletError(
            f"Teacher predictions must lie in [0, {num_classes}), but range over "
            f"[{int(predictions.min())}, {int(predictions.max())}]"
        )
    labels = predictions.t().long()
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones_like(labels))


def plurality(counts: torch.Tensor) -> torch.Tensor:
    """The most voted label of each query; ties go to the smallest label.

    The tie rule is made explicit rather than left to ``torch.argmax`` so that the
    noise-free aggregate is the same on every device and torch version.
    """
    _check_counts(counts)
    return _first_argmax(counts.double())


def laplace_noise(
    shape: tuple[int, ...], gamma: float, generator: Generator = None, device: Device = "cpu"
) -> torch.Tensor:
    """float64 Laplace noise of scale ``1 / gamma`` (mean absolute deviation ``1 / gamma``).

    Drawn as the difference of two Exp(1) variables, which needs only the generator's
    ``exponential_`` and, unlike the inverse CDF of a uniform, never hits log(0).
    """
    check_gamma(gamma)
    _check_generator(generator, torch.device(device))
    first = torch.empty(shape, dtype=torch.float64, device=device).exponential_(generator=generator)
    second = torch.empty(shape, dtype=torch.float64, device=device).exponential_(
        generator=generator
    )
    return (first - second) / gamma


def gaussian_noise(
    shape: tuple[int, ...], sigma: float, generator: Generator = None, device: Device = "cpu"
) -> torch.Tensor:
    """float64 N(0, sigma^2) noise."""
    check_sigma(sigma, "sigma", NOISE_SIGMA_RANGE)
    _check_generator(generator, torch.device(device))
    noise = torch.randn(shape, dtype=torch.float64, device=device, generator=generator)
    return noise * sigma


def lnmax(
    counts: torch.Tensor, gamma: float | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LNMax (Papernot et al. 2017): argmax_j (n_j + Lap(1 / gamma)) for each query.

    Each answer is (2 gamma, 0)-DP with respect to one teacher's vote. ``gamma`` of None
    or infinity switches the noise off and returns ``plurality(counts)`` exactly.
    """
    _check_counts(counts)
    check_gamma(gamma, allow_off=True)
    if gamma is None or math.isinf(gamma):
        return plurality(counts)
    noise = laplace_noise(tuple(counts.shape), gamma, generator, counts.device)
    return _first_argmax(counts.double() + noise)


def gnmax(
    counts: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """GNMax (Papernot et al. 2018): argmax_j (n_j + N(0, sigma^2)) for each query.

    ``sigma`` of 0 switches the noise off and returns ``plurality(counts)`` exactly.
    """
    _check_counts(counts)
    check_sigma(sigma, "sigma", NOISE_SIGMA_RANGE)
    if sigma == 0:
        return plurality(counts)
    noise = gaussian_noise(tuple(counts.shape), sigma, generator, counts.device)
    return _first_argmax(counts.double() + noise)


def confident_gnmax(
    counts: torch.Tensor,
    threshold: float,
    sigma1: float,
    sigma2: float,
    generator: torch.Generator | None = None,
) -> ConfidentVotes:
    """Confident-GNMax (Papernot et al. 2018, Algorithm 1).

    A query is answered only if its top vote count plus N(0, sigma1^2) reaches
    ``threshold``, and then with GNMax at ``sigma2``; the others are refused (label -1).
    Refusing the queries the teachers disagree on is what makes the data-dependent
    privacy cost small: the answered ones have large margins.

    The threshold noise for every query is drawn first, then the GNMax noise for every
    query (refused ones included), so a seed fixes all answers whatever gets refused.
    """
    _check_counts(counts)
    check_number(threshold, "threshold")
    if not math.isfinite(threshold):
        raise GauntletError(f"threshold must be finite, but got {threshold}")
    check_sigma(sigma1, "sigma1", NOISE_SIGMA_RANGE)
    check_sigma(sigma2, "sigma2", NOISE_SIGMA_RANGE)
    top = counts.double().max(dim=1).values
    if sigma1 > 0:
        top = top + gaussian_noise(tuple(top.shape), sigma1, generator, counts.device)
    answered = top >= threshold
    labels = gnmax(counts, sigma2, generator)
    return ConfidentVotes(torch.where(answered, labels, torch.full_like(labels, REFUSED)), answered)


def _first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax that returns the smallest index among equal maxima."""
    classes = scores.shape[1]
    index = torch.arange(classes, device=scores.device).expand_as(scores)
    is_max = scores == scores.max(dim=1, keepdim=True).values
    return torch.where(is_max, index, torch.full_like(index, classes)).min(dim=1).values


def _check_counts(counts: torch.Tensor) -> None:
    if not isinstance(counts, torch.Tensor):
        raise GauntletError(f"Vote counts must be a torch tensor, but got {type(counts).__name__}")
    if counts.dim() != 2 or counts.shape[1] < 1:
        raise GauntletError(
            "Vote counts must be a 2-D (queries, classes) tensor with at least one class, "
            f"but got shape {tuple(counts.shape)}"
        )
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise GauntletError(
            f"Vote counts must be integers, not {counts.dtype}; build them with vote_counts()"
        )
    if counts.numel() and counts.min() < 0:
        raise GauntletError("Vote counts must be non-negative")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise GauntletError(
            f"The generator is on {generator.device.type} but the votes are on {device.type}; "
            "create the generator on the votes' device"
        )
