"""The backdoor and privacy tables: one row per finished configuration, from SQL alone.

A backdoor row is (model, trigger, poison rate, defense) with clean accuracy and attack
success rate before and after the defense; a privacy row is (model, aggregator,
teachers, backdoored teachers) with eps, delta, student accuracy and the student's ASR.
Each configuration is one job key, so a nightly rerun replaces its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from gauntlet.db.schema import Job
from gauntlet.scheduler.boards.metrics import done_metric_rows


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
    rows: dict[int, TrackRow] = {}
    columns = (Job.dataset, Job.attack, Job.details)
    for job_id, model_id, name, ds, method, details, metric, value, n in done_metric_rows(
        engine, kind, columns, dataset=dataset
    ):
        settings = (details or {}).get("settings") or {}
        row = rows.setdefault(job_id, TrackRow(job_id, model_id, name, ds, method, settings, 0, {}))
        row.metrics[metric] = value
        row.n = max(row.n, n)
    return sorted(rows.values(), key=lambda r: (r.dataset, r.model, r.method, r.job_id))
