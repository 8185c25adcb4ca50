"""The backdoor and privacy tables: one row per finished configuration, from SQL alone.

A backdoor row is (model, trigger, poison rate, defense) with clean accuracy and attack
success rate before and after the defense; a privacy row is (model, aggregator,
teachers, backdoored teachers) with eps, delta, student accuracy and the student's ASR.
Each configuration is one job key, so a nightly rerun replaces its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from db.schema import Job, JobStatus, MetricRow, Model


@dataclass
class TrackRow:
    job_id: int
    model_id: str
    model: str
    dataset: str
    method: str  # the backdoor defense, or the PATE aggregator
    settings: dict  # the resolved settings the job ran with
    n: int
    metrics: dict


def track_table(engine: sa.Engine, kind: str, *, dataset: str | None = None) -> list[TrackRow]:
    """Done jobs of ``kind`` (backdoor or pate) with their metrics and settings."""
    stmt = (
        sa.select(
            Job.id,
            Model.id,
            Model.name,
            Job.dataset,
            Job.attack,
            Job.details,
            MetricRow.name,
            MetricRow.value,
            MetricRow.n,
        )
        .join(Model, Model.id == Job.model_id)
        .join(MetricRow, MetricRow.job_id == Job.id)
        .where(Job.status == JobStatus.done, Job.kind == kind)
        .order_by(Job.id)
    )
    if dataset is not None:
        stmt = stmt.where(Job.dataset == dataset)
    rows: dict[int, TrackRow] = {}
    with engine.connect() as conn:
        for job_id, model_id, name, ds, method, details, metric, value, n in conn.execute(stmt):
            settings = (details or {}).get("settings") or {}
            row = rows.setdefault(
                job_id, TrackRow(job_id, model_id, name, ds, method, settings, 0, {})
            )
            row.metrics[metric] = value
            row.n = max(row.n, n)
    return sorted(rows.values(), key=lambda r: (r.dataset, r.model, r.method, r.job_id))
