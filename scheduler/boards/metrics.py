"""Queries over finished jobs: the shared tail of every board's query, and the metric
rows of finished jobs of one kind behind the per-kind tables."""

from __future__ import annotations

import sqlalchemy as sa

from gauntlet.db.schema import Job, JobStatus, MetricRow, Model


def done_rows(engine: sa.Engine, stmt: sa.Select, *, dataset: str | None = None) -> list[sa.Row]:
    """The rows of ``stmt`` restricted to done jobs (of ``dataset`` if given), by job id.

    In job id order, so a caller that keeps the last row per key keeps the newest job.
    """
    stmt = stmt.where(Job.status == JobStatus.done).order_by(Job.id)
    if dataset is not None:
        stmt = stmt.where(Job.dataset == dataset)
    with engine.connect() as conn:
        return list(conn.execute(stmt))


def done_metric_rows(
    engine: sa.Engine, kind: str, columns: tuple, *, dataset: str | None = None
) -> list[sa.Row]:
    """(job id, model id, model name, *columns, metric name, value, n) of done ``kind`` jobs.

    In job id order, so a caller that keeps the last row per key keeps the newest job.
    """
    stmt = (
        sa.select(
            Job.id, Model.id, Model.name, *columns, MetricRow.name, MetricRow.value, MetricRow.n
        )
        .join(Model, Model.id == Job.model_id)
        .join(MetricRow, MetricRow.job_id == Job.id)
        .where(Job.kind == kind)
    )
    return done_rows(engine, stmt, dataset=dataset)
