"""Calibration of a classifier's confidence: ECE, MCE, NLL, Brier and temperature scaling.

API convention: the binned measures (``ece``, ``adaptive_ece``, ``classwise_ece``,
``brier``, ``bin_stats``) take probabilities ``probs`` of shape (N, K) whose rows sum to 1;
the caller applies ``softmax`` to logits. ``nll``, ``fit_temperature``,
``calibration_metrics`` and ``temperature_report`` take raw logits (N, K), because NLL and
temperature scaling are defined on logits and computing them from logits is more stable.
Labels are int64 of shape (N,). All arithmetic runs in float64 so results do not depend on
the model's dtype, and every function returns plain Python floats.

Binning (Guo et al. 2017): M equal-width bins with intervals ((m-1)/M, m/M]; a confidence of
exactly 0 goes in the first bin. torchmetrics' ``MulticlassCalibrationError`` uses
[(m-1)/M, m/M) instead (``torch.bucketize(..., right=True)``), so the two agree except when
a confidence lies exactly on an inner bin edge, which with real softmax outputs almost never
happens; we keep Guo's convention because it is the one the paper and our docs define.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.results import Metric, wilson_interval

# A prediction made with more confidence than this and wrong counts as an overconfident error.
OVERCONFIDENT_THRESHOLD = 0.9
# Rows of ``probs`` must sum to 1 within this; catches logits passed where probs belong.
_ROW_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics behind ECE and the reliability diagram (float64 tensors, (M,)).

    ``lo`` / ``hi`` are the bin's interval for equal-width bins and the smallest / largest
    confidence inside it for equal-mass bins. Empty bins have count 0 and accuracy and
    confidence 0.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    count: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        return (self.accuracy - self.confidence).abs()

    def weighted_gap(self) -> float:
        """ECE over these bins: sum_m |B_m|/n |acc(B_m) - conf(B_m)|."""
        total = self.count.sum()
        return float((self.count / total * self.gap).sum())

    def max_gap(self) -> float:
        """MCE: the largest gap over non-empty bins."""
        non_empty = self.count > 0
        return float(self.gap[non_empty].max()) if non_empty.any() else 0.0


def _check_n_bins(n_bins: int) -> None:
    # bool is an int subclass, but True bins is a caller bug.
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise GauntletError(f"Expected `n_bins` to be an integer >= 1, but got {n_bins!r}")


def _check_scores(scores: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """Validate (N, K) scores against (N,) labels; return the scores as float64."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise GauntletError(f"Expected `{name}` to be a tensor of shape (N, K), but got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise GauntletError(f"Expected `labels` to be a tensor of shape (N,), but got {shape}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise GauntletError(f"Expected `labels` to be an integer tensor, but got {labels.dtype}")
    n, k = scores.shape
    if labels.shape[0] != n:
        raise GauntletError(
            f"Expected `labels` to have {n} entries to match `{name}`, but got {labels.shape[0]}"
        )
    if n == 0 or k == 0:
        raise GauntletError(f"Expected a non-empty `{name}`, but got shape {(n, k)}")
    scores = scores.detach().to(torch.float64)
    if not torch.isfinite(scores).all():
        raise GauntletError(f"Expected finite `{name}`, but got NaN or infinite values")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        raise GauntletError(f"Expected `labels` in [0, {k - 1}], but got values in [{low}, {high}]")
    return scores


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    probs = _check_scores(probs, labels, "probs")
    if probs.min() < 0 or probs.max() > 1:
        raise GauntletError(
            "Expected `probs` in [0, 1] (apply softmax to logits first), but got values in "
            f"[{float(probs.min()):.4g}, {float(probs.max()):.4g}]"
        )
    worst = float((probs.sum(dim=1) - 1).abs().max())
    if worst > _ROW_SUM_TOLERANCE:
        raise GauntletError(
            "Expected each row of `probs` to sum to 1 (apply softmax to logits first), but got "
            f"a row off by {worst:.4g}"
        )
    return probs


def _equal_width_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index of each confidence for intervals (lo, hi]; 0 goes in the first bin."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # right=False gives edges[i-1] < x <= edges[i] over the inner edges, i.e. (lo, hi].
    return torch.bucketize(confidence, edges[1:-1], right=False)


def _aggregate(
    index: torch.Tensor, confidence: torch.Tensor, hits: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean accuracy and mean confidence per bin (zeros for empty bins)."""
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(
        0, index, torch.ones_like(confidence)
    )
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, confidence)
    hit_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, hits)
    safe = count.clamp(min=1)
    return count, hit_sum / safe, conf_sum / safe


def _bins_from(
    confidence: torch.Tensor, hits: torch.Tensor, n_bins: int, equal_mass: bool
) -> CalibrationBins:
    if not equal_mass:
        index = _equal_width_index(confidence, n_bins)
        count, accuracy, mean_conf = _aggregate(index, confidence, hits, n_bins)
        edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
        return CalibrationBins(edges[:-1], edges[1:], count, accuracy, mean_conf)
    # Equal mass: sort by confidence and cut into n_bins groups whose sizes differ by at most
    # one (tensor_split puts the larger groups first). With N < n_bins some groups are empty.
    order = torch.argsort(confidence, stable=True)
    index = torch.empty_like(order)
    for m, chunk in enumerate(torch.tensor_split(order, n_bins)):
        index[chunk] = m
    count, accuracy, mean_conf = _aggregate(index, confidence, hits, n_bins)
    inf = torch.full((n_bins,), float("inf"), dtype=torch.float64)
    lo = inf.scatter_reduce(0, index, confidence, reduce="amin")
    hi = (-inf).scatter_reduce(0, index, confidence, reduce="amax")
    empty = count == 0
    return CalibrationBins(
        lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0), count, accuracy, mean_conf
    )


def bin_stats(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, *, equal_mass: bool = False
) -> CalibrationBins:
    """Top-label confidence bins: equal-width (Guo) by default, equal-mass if asked."""
    _check_n_bins(n_bins)
    probs = _check_probs(probs, labels)
    confidence, predicted = probs.max(dim=1)
    hits = (predicted == labels).to(torch.float64)
    return _bins_from(confidence, hits, n_bins, equal_mass)


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> tuple[float, float]:
    """(ECE, MCE) of the top-label confidence over equal-width bins (Guo et al. 2017)."""
    bins = bin_stats(probs, labels, n_bins)
    return bins.weighted_gap(), bins.max_gap()


def adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over equal-mass bins, which equal-width ECE under-resolves near confidence 1."""
    return bin_stats(probs, labels, n_bins, equal_mass=True).weighted_gap()


def classwise_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Mean over classes of the equal-width ECE of p_k against 1[y == k] (Kull et al. 2019)."""
    _check_n_bins(n_bins)
    probs = _check_probs(probs, labels)
    n, k = probs.shape
    targets = F.one_hot(labels.long(), k).to(torch.float64)
    # Bin all classes in one scatter: class c's bins occupy slots [c * M, (c + 1) * M).
    index = _equal_width_index(probs, n_bins) + torch.arange(k) * n_bins
    count, freq, mean_p = _aggregate(
        index.flatten(), probs.flatten(), targets.flatten(), k * n_bins
    )
    per_class = (count / n * (freq - mean_p).abs()).view(k, n_bins).sum(dim=1)
    return float(per_class.mean())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    logits = _check_scores(logits, labels, "logits")
    return float(F.cross_entropy(logits, labels.long()))


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of sum_k (p_k - 1[y == k])^2 (ranges over [0, 2])."""
    probs = _check_probs(probs, labels)
    targets = F.one_hot(labels.long(), probs.shape[1]).to(torch.float64)
    return float(((probs - targets) ** 2).sum(dim=1).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T); fit it on a held-out split.

    LBFGS optimises log T, so T stays positive without constraints. Dividing by one positive
    T never changes the argmax, so accuracy is unchanged by construction.
    """
    logits = _check_scores(logits, labels, "logits")
    targets = labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not (temperature > 0 and temperature < float("inf")):
        raise GauntletError(f"Expected temperature fitting to converge, but got T={temperature}")
    return temperature


def calibration_metrics(
    logits: torch.Tensor, labels: torch.Tensor, *, prefix: str = "", n_bins: int = 15
) -> list[Metric]:
    """Accuracy and the calibration measures of one set of logits, names prefixed."""
    _check_n_bins(n_bins)
    logits = _check_scores(logits, labels, "logits")
    probs = logits.softmax(dim=1)
    n = logits.shape[0]
    confidence, predicted = probs.max(dim=1)
    correct = predicted == labels
    n_correct = int(correct.sum())
    n_overconfident = int((~correct & (confidence > OVERCONFIDENT_THRESHOLD)).sum())
    bins = _bins_from(confidence, correct.to(torch.float64), n_bins, equal_mass=False)

    def metric(name: str, value: float, interval: tuple[float, float] | None = None) -> Metric:
        low, high = interval if interval is not None else (None, None)
        return Metric(prefix + name, float(value), n, low, high)

    return [
        metric("accuracy", n_correct / n, wilson_interval(n_correct, n)),
        metric("ece", bins.weighted_gap()),
        metric("mce", bins.max_gap()),
        metric("adaptive_ece", adaptive_ece(probs, labels, n_bins)),
        metric("classwise_ece", classwise_ece(probs, labels, n_bins)),
        metric("nll", nll(logits, labels)),
        metric("brier", brier(probs, labels)),
        metric("mean_confidence", float(confidence.mean())),
        metric("overconfident_errors", n_overconfident / n, wilson_interval(n_overconfident, n)),
    ]


def temperature_report(
    logits_fit: torch.Tensor,
    labels_fit: torch.Tensor,
    logits_eval: torch.Tensor,
    labels_eval: torch.Tensor,
    n_bins: int = 15,
) -> tuple[float, list[Metric], list[Metric]]:
    """Fit T on one split, then report the other split's metrics before and after scaling.

    ``before`` names are unprefixed; ``after`` names carry ``after_ts_``.
    """
    temperature = fit_temperature(logits_fit, labels_fit)
    logits_eval = _check_scores(logits_eval, labels_eval, "logits_eval")
    before = calibration_metrics(logits_eval, labels_eval, n_bins=n_bins)
    after = calibration_metrics(
        logits_eval / temperature, labels_eval, prefix="after_ts_", n_bins=n_bins
    )
    return temperature, before, after
