"""The calibration table: one row per model (and defense), from SQL alone."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from db.schema import Job, JobStatus, MetricRow, Model

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


def calibration_table(engine: sa.Engine, *, dataset: str | None = None) -> list[CalibrationRow]:
    stmt = (
        sa.select(
            Job.id,
            Model.id,
            Model.name,
            Job.defense,
            Job.dataset,
            Job.subset_key,
            MetricRow.name,
            MetricRow.value,
            MetricRow.n,
        )
        .join(Model, Model.id == Job.model_id)
        .join(MetricRow, MetricRow.job_id == Job.id)
        .where(Job.status == JobStatus.done, Job.kind == "calibration")
        .order_by(Job.id)
    )
    if dataset is not None:
        stmt = stmt.where(Job.dataset == dataset)
    rows: dict[tuple, CalibrationRow] = {}
    latest: dict[tuple, int] = {}
    with engine.connect() as conn:
        for job_id, model_id, name, defense, ds, subset, metric, value, n in conn.execute(stmt):
            key = (model_id, defense, ds, subset)
            if latest.get(key, job_id) != job_id:
                rows.pop(key, None)  # a later calibration job replaces an earlier one
            latest[key] = job_id
            row = rows.setdefault(key, CalibrationRow(model_id, name, defense, ds, subset, 0, {}))
            row.metrics[metric] = value
            if metric == "accuracy":
                row.n = n
    return sorted(rows.values(), key=lambda r: (r.dataset, r.metrics.get("ece", 1.0), r.model))
