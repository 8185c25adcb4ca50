"""Where the temperature is fitted: held-out test points, never training or scored ones."""

from __future__ import annotations

import numpy as np
import torch

from gauntlet.scheduler.boards.calibration import CalibrationRow
from gauntlet.workers.context import JobContext
from gauntlet.workers.datasets import _digits_arrays, eval_subset
from gauntlet.workers.jobs import calibration as job


def _digits_ids(split: str) -> np.ndarray:
    """The original digits ids behind each position of ``split`` (as the loader orders them)."""
    _, _, order = _digits_arrays()
    return np.sort(order[:1347] if split == "train" else order[1347:])


def test_holdout_is_disjoint_from_training_and_evaluated_points():
    _, _, indices = eval_subset("digits", 150, 4, "")
    x_fit, y_fit, fit = job.holdout_split("digits", "", indices, 4)
    assert len(fit) == len(y_fit) == len(x_fit) == 450 - 150  # all that is left, under 500
    assert not set(fit.tolist()) & set(indices.tolist())
    held_out_ids = _digits_ids("test")[fit.numpy()]
    assert not set(held_out_ids.tolist()) & set(_digits_ids("train").tolist())
    # Seeded: the same job picks the same points.
    assert torch.equal(job.holdout_split("digits", "", indices, 4)[2], fit)


def test_holdout_of_a_large_test_split_is_a_seeded_sample_of_500(monkeypatch):
    x = torch.zeros(2000, 1, 8, 8)
    y = torch.arange(2000) % 10
    monkeypatch.setattr(job, "load_split", lambda *_: (x, y))
    indices = torch.arange(0, 2000, 2)
    _, _, fit = job.holdout_split("any", "", indices, 0)
    assert len(fit) == job.HOLDOUT and bool((fit % 2 == 1).all())
    assert not torch.equal(fit, job.holdout_split("any", "", indices, 1)[2])
    # Fewer than MIN_HOLDOUT points left: no split at all.
    assert job.holdout_split("any", "", torch.arange(1960), 0) is None


def _calibrate(stored, n: int):
    model, store = stored
    spec = {"dataset": "digits", "seed": 0, "n": n, "attack": "calibration", "batch_size": 64}
    ctx = JobContext(spec, model, store, "", device_label="cpu")
    ctx.device = torch.device("cpu")
    result = job.run(ctx)
    return {m.name: m for m in result.metrics}, result.details


def test_calibration_records_the_held_out_split(stored):
    metrics, details = _calibrate(stored, 150)
    assert details["temperature_split"] == job.HELD_OUT_SPLIT
    assert details["temperature_n"] == 300 == metrics["temperature"].n
    assert details["temperature"] == metrics["temperature"].value > 0
    assert "after_ts_ece" in metrics and "temperature_note" not in details


def test_no_temperature_when_the_subset_covers_the_test_split(stored):
    metrics, details = _calibrate(stored, 450)
    assert details["temperature"] is None and details["temperature_split"] is None
    assert "450 of the 450 test points" in details["temperature_note"]
    assert "training split" in details["temperature_note"]
    assert "temperature" not in metrics
    assert not [name for name in metrics if name.startswith("after_ts_")]
    assert metrics["ece"].n == 450  # the calibration itself is still measured


def test_boards_show_a_dash_for_a_missing_temperature():
    from gauntlet.scheduler.cli.tables import calibration_table
    from gauntlet.scheduler.web.boards import calibration_html
    from gauntlet.scheduler.web.html import DASH

    row = CalibrationRow("m" * 64, "m", None, "digits", "k", 450, {"accuracy": 0.9, "ece": 0.05})
    html = calibration_html([row], {row.model_id: {}})
    assert "0.05" in html and DASH in html
    table = calibration_table([row])
    column = [c.header for c in table.columns].index("temperature")
    assert list(table.columns[column].cells) == ["-"]


def test_confidence_under_attack_goes_through_the_adaptive_surface(stored):
    """A non-differentiable defense: the adv_ numbers come from the BPDA attack, not plain PGD.

    Plain PGD on bit-depth reduction sees zero gradients and leaves the defended model
    confidently right; through BPDA the same job finds the errors the defense hides.
    """
    from tests.service_helpers import run_eval

    def calibrate(adaptive: bool):
        result = run_eval(stored, n=64, kind="calibration", defense="bit-depth", adaptive=adaptive)
        return {m.name: m.value for m in result.metrics}, result.details

    plain, plain_details = calibrate(False)
    adaptive, details = calibrate(True)
    assert plain_details["adaptations"] == [] and details["adaptations"] == ["bpda"]
    assert plain["accuracy"] == adaptive["accuracy"] > 0.85  # clean numbers do not depend on it
    assert plain["adv_accuracy"] > 0.8 * plain["accuracy"]
    assert adaptive["adv_accuracy"] < plain["adv_accuracy"] - 0.4
