"""The calibration and corruption tables: one row per model (and defense), from SQL alone."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from gauntlet.db.schema import Job
from gauntlet.scheduler.boards.metrics import done_metric_rows

COLUMNS = (
    "accuracy",
    "ece",
    "mce",
    "after_ts_ece",
    "temperature",
    "nll",
    "brier",
    "overconfident_errors",
    "adv_ece",
    "adv_mean_confidence",
)


@dataclass
class CalibrationRow:
    model_id: str
    model: str
    defense: str | None
    dataset: str
    subset_key: str
    n: int
    metrics: dict


def calibration_table(
    engine: sa.Engine, *, dataset: str | None = None, kind: str = "calibration"
) -> list[CalibrationRow]:
    """The latest done job of ``kind`` per model, defense and subset, with its metrics."""
    rows: dict[tuple, CalibrationRow] = {}
    latest: dict[tuple, int] = {}
    columns = (Job.defense, Job.dataset, Job.subset_key)
    for job_id, model_id, name, defense, ds, subset, metric, value, n in done_metric_rows(
        engine, kind, columns, dataset=dataset
    ):
        key = (model_id, defense, ds, subset)
        if latest.get(key, job_id) != job_id:
            rows.pop(key, None)  # a later calibration job replaces an earlier one
        latest[key] = job_id
        row = rows.setdefault(key, CalibrationRow(model_id, name, defense, ds, subset, 0, {}))
        row.metrics[metric] = value
        if metric in ("accuracy", "clean_accuracy"):
            row.n = n
    order = "ece" if kind == "calibration" else "mean_corruption_accuracy"
    sign = 1 if kind == "calibration" else -1
    return sorted(
        rows.values(), key=lambda r: (r.dataset, sign * r.metrics.get(order, 1.0), r.model)
    )
