"""Metric rows of finished jobs of one kind: the query behind the per-kind tables."""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa

from gauntlet.db.schema import Job, JobStatus, MetricRow, Model


def done_metric_rows(
    engine: sa.Engine, kind: str, columns: tuple, *, dataset: str | None = None
) -> Iterator[tuple]:
    """(job id, model id, model name, *columns, metric name, value, n) of done ``kind`` jobs.

    In job id order, so a caller that keeps the last row per key keeps the newest job.
    """
    stmt = (
        sa.select(
            Job.id, Model.id, Model.name, *columns, MetricRow.name, MetricRow.value, MetricRow.n
        )
        .join(Model, Model.id == Job.model_id)
        .join(MetricRow, MetricRow.job_id == Job.id)
        .where(Job.status == JobStatus.done, Job.kind == kind)
        .order_by(Job.id)
    )
    if dataset is not None:
        stmt = stmt.where(Job.dataset == dataset)
    with engine.connect() as conn:
        yield from conn.execute(stmt)
