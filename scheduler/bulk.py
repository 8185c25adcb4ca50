"""The dispatcher's SQL in batches: many jobs per statement and per transaction.

A small job (clean accuracy on ten points) costs a few milliseconds of compute; one
transaction per read, claim and result would cost more than the job. These are the
same compare-and-set writes as ``lifecycle.claim`` and ``lifecycle.finish``, fenced the
same way, only many rows at a time:

- ``get_jobs``: the rows of a batch of delivered entries, one SELECT;
- ``claim_many``: one conditional UPDATE takes every still-claimable job of the batch
  (queued, or running with a lapsed lease) and says which ones it took; a job another
  replica holds is simply not in the answer, exactly as ``claim`` would return None;
- ``finish_many``: every result of a batch in one transaction, each behind its own
  fence (owner and attempt), so a result whose lease was lost is dropped alone.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from gauntlet.db.schema import Job, JobStatus, MetricRow, Model, Outcome, SubTask, utcnow
from gauntlet.scheduler.lifecycle import Claim, _check_result, _model_dict
from gauntlet.workers.results import JobResult

# Bound parameters per IN list: well under SQLite's and PostgreSQL's limits.
CHUNK = 500


def _chunks(items: list, size: int = CHUNK):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def get_jobs(engine: sa.Engine, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Every column of each job (as ``lifecycle.get_job``), by id; absent ids are missing."""
    rows: dict[int, dict[str, Any]] = {}
    with engine.connect() as conn:
        for part in _chunks(sorted(set(job_ids))):
            stmt = (
                sa.select(Job.__table__, Model.name.label("model"))
                .join(Model, Model.id == Job.model_id)
                .where(Job.id.in_(part))
            )
            rows.update({row.id: dict(row._mapping) for row in conn.execute(stmt)})
    return rows


def claim_many(
    engine: sa.Engine,
    job_ids: list[int],
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> dict[int, Claim]:
    """Claim what can be claimed of ``job_ids``: {job id: Claim} for the ones taken."""
    now = now or utcnow()
    claims: dict[int, Claim] = {}
    if not job_ids:
        return claims
    with engine.begin() as conn:
        taken = []
        for part in _chunks(sorted(set(job_ids))):
            stmt = (
                sa.update(Job)
                .where(
                    Job.id.in_(part),
                    sa.or_(
                        Job.status == JobStatus.queued,
                        sa.and_(Job.status == JobStatus.running, Job.lease_expires_at < now),
                    ),
                )
                .values(
                    status=JobStatus.running,
                    attempts=Job.attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    started_at=now,
                )
                .returning(Job.id, Job.attempts, Job.spec, Job.model_id)
            )
            taken.extend(conn.execute(stmt).all())
        model_ids = sorted({row.model_id for row in taken})
        models = {}
        for part in _chunks(model_ids):
            for model in conn.execute(sa.select(Model).where(Model.id.in_(part))):
                models[model.id] = _model_dict(model)
    for row in taken:
        claims[row.id] = Claim(row.id, row.attempts, owner, row.spec, models[row.model_id])
    return claims


def finish_many(
    engine: sa.Engine,
    owner: str,
    results: list[tuple[int, int, JobResult]],
    now: datetime | None = None,
) -> set[int]:
    """Store (job id, attempt, result) triples in one transaction; the ids stored.

    Each job's fenced UPDATE runs first, as in ``lifecycle.finish``; the rows of the jobs
    whose fence held are then replaced together. A result that fails its checks raises
    before anything is written, so the caller can store the batch one by one instead.
    """
    for _, _, result in results:
        _check_result(result)
    now = now or utcnow()
    stored: list[tuple[int, JobResult]] = []
    # ``lifecycle._fenced``'s conditions on the Core table: the ORM's UPDATE machinery
    # costs more per statement than the statement itself at this size.
    jobs = Job.__table__
    fenced = (
        sa.update(jobs)
        .where(
            jobs.c.id == sa.bindparam("jid"),
            jobs.c.status == JobStatus.running,
            jobs.c.lease_owner == owner,
            jobs.c.attempts == sa.bindparam("attempt"),
        )
        .values(
            status=JobStatus.done,
            finished_at=now,
            lease_expires_at=None,
            worker_host=sa.bindparam("host"),
            device=sa.bindparam("dev"),
            code_version=sa.bindparam("code"),
            seconds=sa.bindparam("secs"),
            details=sa.bindparam("info", type_=jobs.c.details.type),
            error=None,
        )
    )
    with engine.begin() as conn:
        for job_id, attempt, result in results:
            values = {
                "jid": job_id,
                "attempt": attempt,
                "host": result.worker_host or None,
                "dev": result.device or None,
                "code": result.code_version or None,
                "secs": result.seconds,
                "info": result.details or None,
            }
            if conn.execute(fenced, values).rowcount == 1:
                stored.append((job_id, result))
        ids = [job_id for job_id, _ in stored]
        for part in _chunks(ids):
            for table in (MetricRow.__table__, Outcome.__table__, SubTask.__table__):
                conn.execute(sa.delete(table).where(table.c.job_id.in_(part)))
        metrics = [
            dict(
                job_id=job_id,
                name=m.name,
                value=float(m.value),
                n=m.n,
                ci_low=m.low,
                ci_high=m.high,
            )
            for job_id, result in stored
            for m in result.metrics
        ]
        outcomes = [
            dict(job_id=job_id, n=r.n, clean=bytes(r.clean), robust=bytes(r.robust))
            for job_id, r in stored
        ]
        subtasks = [
            {"job_id": job_id, **asdict(record)} for job_id, r in stored for record in r.subtasks
        ]
        for table, rows in ((MetricRow, metrics), (Outcome, outcomes), (SubTask, subtasks)):
            if rows:
                conn.execute(sa.insert(table.__table__), rows)
    return set(ids)
