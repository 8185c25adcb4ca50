"""Calibration measures against closed forms, torchmetrics and synthetic calibrated data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.calibration.diagram import reliability_diagram_png
from gauntlet.workers.calibration.metrics import (
    adaptive_ece,
    bin_stats,
    brier,
    calibration_metrics,
    classwise_ece,
    ece,
    fit_temperature,
    nll,
    temperature_report,
)


def _by_name(metrics: list) -> dict:
    return {metric.name: metric for metric in metrics}


def _sample_labels(probs: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def test_closed_form_confidence_09_with_80_percent_correct() -> None:
    n = 100
    probs = torch.zeros(n, 4, dtype=torch.float64)
    probs[:, 0] = 0.9
    probs[:, 1:] = 0.1 / 3
    labels = torch.zeros(n, dtype=torch.int64)
    labels[80:] = 2  # 80 right, 20 wrong
    ece_value, mce_value = ece(probs, labels)
    assert ece_value == pytest.approx(0.10, abs=1e-12)
    assert mce_value == pytest.approx(0.10, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ece_and_mce_equal_torchmetrics(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    k = 3 + seed
    logits = torch.randn(500, k, generator=generator) * (1 + seed)
    labels = torch.randint(0, k, (500,), generator=generator)
    probs = logits.softmax(dim=1)
    ece_value, mce_value = ece(probs, labels, n_bins=15)
    l1 = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")(probs, labels)
    top = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="max")(probs, labels)
    assert ece_value == pytest.approx(float(l1), abs=1e-6)
    assert mce_value == pytest.approx(float(top), abs=1e-6)


def test_bin_edges_follow_guo_lo_hi_closed_unlike_torchmetrics() -> None:
    # Confidence exactly 0.4 with 5 bins: Guo's (lo, hi] puts it in (0.2, 0.4], while
    # torchmetrics' bucketize(right=True) puts it in [0.4, 0.6) with the 0.5s.
    row_04 = [0.4, 0.3, 0.3]
    row_05 = [0.5, 0.25, 0.25]
    probs = torch.tensor([row_04, row_04, row_05, row_05], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])  # the 0.4s half right, the 0.5s both wrong
    ece_value, mce_value = ece(probs, labels, n_bins=5)
    # bins (0.2, 0.4]: gap |0.5 - 0.4| = 0.1; (0.4, 0.6]: gap |0 - 0.5| = 0.5; weights 1/2.
    assert ece_value == pytest.approx(0.30, abs=1e-12)
    assert mce_value == pytest.approx(0.50, abs=1e-12)
    bins = bin_stats(probs, labels, n_bins=5)
    assert bins.count.tolist() == [0, 2, 2, 0, 0]
    # The documented difference: torchmetrics merges all four into one bin (gap 0.2).
    tm = MulticlassCalibrationError(num_classes=3, n_bins=5, norm="l1")(probs, labels)
    assert float(tm) == pytest.approx(0.20, abs=1e-6)
    # The edges at 0 and 1: confidence 1.0 lands in the last bin (never out of range).
    one_hot = torch.eye(3, dtype=torch.float64)
    assert bin_stats(one_hot, torch.arange(3), n_bins=5).count.tolist() == [0, 0, 0, 0, 3]


def test_brier_and_nll_against_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    labels = torch.tensor([0, 1])
    probs = logits.softmax(dim=1).double()
    by_hand = 0.0
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        by_hand += sum((p - (1.0 if j == label else 0.0)) ** 2 for j, p in enumerate(row))
    assert brier(probs, labels) == pytest.approx(by_hand / 2, abs=1e-12)
    assert brier(torch.eye(3, dtype=torch.float64), torch.arange(3)) == 0.0
    expected_nll = -(math.log(probs[0, 0]) + math.log(probs[1, 1])) / 2
    assert nll(logits, labels) == pytest.approx(expected_nll, abs=1e-6)
    assert nll(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), abs=1e-6)


def _overconfident(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, 10, generator=generator) * 1.5
    labels = _sample_labels(true_logits.softmax(dim=1), seed)
    return true_logits * 3, labels


def test_temperature_scaling_recovers_overconfidence() -> None:
    logits_fit, labels_fit = _overconfident(20000, seed=10)
    logits_eval, labels_eval = _overconfident(5000, seed=11)
    temperature = fit_temperature(logits_fit, labels_fit)
    assert temperature == pytest.approx(3.0, rel=0.10)
    same_t, before, after = temperature_report(logits_fit, labels_fit, logits_eval, labels_eval)
    assert same_t == pytest.approx(temperature, rel=1e-9)
    before, after = _by_name(before), _by_name(after)
    assert after["after_ts_accuracy"].value == before["accuracy"].value
    assert after["after_ts_nll"].value <= before["nll"].value
    assert after["after_ts_ece"].value < before["ece"].value
    assert after["after_ts_ece"].value < 0.03
    assert after["after_ts_mean_confidence"].value < before["mean_confidence"].value


def test_temperature_of_calibrated_logits_is_near_one() -> None:
    logits, labels = _overconfident(20000, seed=12)
    assert fit_temperature(logits / 3, labels) == pytest.approx(1.0, rel=0.10)


def test_calibration_metrics_names_intervals_and_overconfident_errors() -> None:
    # Four predictions: right at 0.95, wrong at 0.95, wrong at 0.6, right at 0.6.
    conf_95 = math.log(0.95 / 0.05)
    conf_60 = math.log(0.6 / 0.4)
    logits = torch.tensor([[conf_95, 0.0], [conf_95, 0.0], [conf_60, 0.0], [0.0, conf_60]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = _by_name(calibration_metrics(logits, labels, prefix="adv_"))
    assert set(metrics) == {
        "adv_" + name
        for name in (
            "accuracy",
            "ece",
            "mce",
            "adaptive_ece",
            "classwise_ece",
            "nll",
            "brier",
            "mean_confidence",
            "overconfident_errors",
        )
    }
    assert all(metric.n == 4 for metric in metrics.values())
    assert metrics["adv_accuracy"].value == pytest.approx(0.5)
    assert metrics["adv_overconfident_errors"].value == pytest.approx(0.25)
    low, high = metrics["adv_overconfident_errors"].low, metrics["adv_overconfident_errors"].high
    assert low is not None and high is not None and 0 < low < 0.25 < high < 1
    assert metrics["adv_mean_confidence"].value == pytest.approx((0.95 + 0.6) / 2, abs=1e-6)
    assert metrics["adv_ece"].low is None


def test_adaptive_bins_hold_equal_counts() -> None:
    generator = torch.Generator().manual_seed(5)
    probs = (torch.randn(1003, 6, generator=generator) * 2).softmax(dim=1)
    labels = torch.randint(0, 6, (1003,), generator=generator)
    bins = bin_stats(probs, labels, n_bins=10, equal_mass=True)
    counts = bins.count.tolist()
    assert sum(counts) == 1003
    assert max(counts) - min(counts) <= 1
    # Bins are ordered by confidence and do not overlap.
    assert all(bins.hi[m] <= bins.lo[m + 1] for m in range(9))
    # Equal-mass ECE uses the same formula, so with one bin it equals equal-width ECE.
    assert adaptive_ece(probs, labels, n_bins=1) == pytest.approx(ece(probs, labels, 1)[0])


def test_classwise_ece_near_zero_when_calibrated_and_not_when_sharpened() -> None:
    generator = torch.Generator().manual_seed(7)
    probs = (torch.randn(40000, 5, generator=generator) * 1.5).softmax(dim=1).double()
    labels = _sample_labels(probs, seed=8)
    assert classwise_ece(probs, labels) < 0.01
    sharpened = (probs.log() * 3).softmax(dim=1)
    assert classwise_ece(sharpened, labels) > 0.03


def test_reliability_diagram_is_a_png() -> None:
    generator = torch.Generator().manual_seed(3)
    probs = (torch.randn(300, 4, generator=generator) * 3).softmax(dim=1)
    labels = torch.randint(0, 4, (300,), generator=generator)
    png = reliability_diagram_png(probs, labels, title="clean")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000


def test_bad_inputs_raise_gauntlet_error() -> None:
    probs = torch.full((4, 2), 0.5)
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(
        GauntletError, match=r"^Expected `n_bins` to be an integer >= 1, but got 0$"
    ):
        ece(probs, labels, n_bins=0)
    with pytest.raises(GauntletError, match="n_bins"):
        adaptive_ece(probs, labels, n_bins=2.5)  # type: ignore[arg-type]
    with pytest.raises(GauntletError, match="4 entries"):
        ece(probs, labels[:3])
    with pytest.raises(GauntletError, match="shape"):
        brier(probs[0], labels)
    nan_probs = probs.clone()
    nan_probs[0, 0] = float("nan")
    with pytest.raises(GauntletError, match="finite"):
        ece(nan_probs, labels)
    with pytest.raises(GauntletError, match="softmax"):
        ece(torch.randn(4, 2) * 5, labels)  # logits where probs belong
    with pytest.raises(GauntletError, match="labels"):
        nll(probs, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(GauntletError, match="integer"):
        nll(probs, labels.float())
    with pytest.raises(GauntletError, match="finite"):
        fit_temperature(torch.tensor([[float("inf"), 0.0]]), torch.tensor([0]))
    with pytest.raises(GauntletError):
        reliability_diagram_png(probs, labels, n_bins=0)
