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


# The statements of the hot path are built once: building a SQLAlchemy statement costs
# more than SQLite takes to run it, and an expanding IN keeps one compiled form for any
# list length (the compiled cache does the rest).
_JOBS = Job.__table__
_MODELS = Model.__table__
_GET_JOBS = (
    sa.select(_JOBS, _MODELS.c.name.label("model"))
    .join(_MODELS, _MODELS.c.id == _JOBS.c.model_id)
    .where(_JOBS.c.id.in_(sa.bindparam("ids", expanding=True)))
)
# ``lifecycle.claim``'s compare-and-set: queued, or running with a lapsed lease.
_CLAIM = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.id.in_(sa.bindparam("ids", expanding=True)),
        sa.or_(
            _JOBS.c.status == JobStatus.queued,
            sa.and_(
                _JOBS.c.status == JobStatus.running,
                _JOBS.c.lease_expires_at < sa.bindparam("now", type_=_JOBS.c.started_at.type),
            ),
        ),
    )
    .values(
        status=JobStatus.running,
        attempts=_JOBS.c.attempts + 1,
        lease_owner=sa.bindparam("owner"),
        lease_expires_at=sa.bindparam("expires", type_=_JOBS.c.lease_expires_at.type),
        started_at=sa.bindparam("now", type_=_JOBS.c.started_at.type),
    )
    .returning(_JOBS.c.id, _JOBS.c.attempts, _JOBS.c.spec, _JOBS.c.model_id)
)
# ``lifecycle._fenced``'s conditions: only while this claimant still holds the job.
_FINISH = (
    sa.update(_JOBS)
    .where(
        _JOBS.c.id == sa.bindparam("jid"),
        _JOBS.c.status == JobStatus.running,
        _JOBS.c.lease_owner == sa.bindparam("owner"),
        _JOBS.c.attempts == sa.bindparam("attempt"),
    )
    .values(
        status=JobStatus.done,
        finished_at=sa.bindparam("now", type_=_JOBS.c.finished_at.type),
        lease_expires_at=None,
        worker_host=sa.bindparam("host"),
        device=sa.bindparam("dev"),
        code_version=sa.bindparam("code"),
        seconds=sa.bindparam("secs"),
        details=sa.bindparam("info", type_=_JOBS.c.details.type),
        error=None,
    )
)
# The jobs of a batch that ``_FINISH`` itself marked done.
_FINISHED_NOW = sa.select(_JOBS.c.id).where(
    _JOBS.c.id.in_(sa.bindparam("ids", expanding=True)),
    _JOBS.c.status == JobStatus.done,
    _JOBS.c.lease_owner == sa.bindparam("owner"),
    _JOBS.c.finished_at == sa.bindparam("now", type_=_JOBS.c.finished_at.type),
)
# A result replaces whatever rows an earlier attempt of the job left.
_CLEAR_ROWS = [
    sa.delete(t).where(t.c.job_id.in_(sa.bindparam("ids", expanding=True)))
    for t in (MetricRow.__table__, Outcome.__table__, SubTask.__table__)
]
_GET_MODELS = sa.select(_MODELS).where(_MODELS.c.id.in_(sa.bindparam("ids", expanding=True)))


def get_jobs(engine: sa.Engine, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Every column of each job (as ``lifecycle.get_job``), by id; absent ids are missing."""
    rows: dict[int, dict[str, Any]] = {}
    with engine.connect() as conn:
        for part in _chunks(sorted(set(job_ids))):
            rows.update(
                {row.id: dict(row._mapping) for row in conn.execute(_GET_JOBS, {"ids": part})}
            )
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
    values = {"owner": owner, "now": now, "expires": now + timedelta(seconds=lease_seconds)}
    with engine.begin() as conn:
        taken = []
        for part in _chunks(sorted(set(job_ids))):
            taken.extend(conn.execute(_CLAIM, {**values, "ids": part}).all())
        models = {}
        for part in _chunks(sorted({row.model_id for row in taken})):
            for model in conn.execute(_GET_MODELS, {"ids": part}):
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
    rows = [
        {
            "jid": job_id,
            "attempt": attempt,
            "host": result.worker_host or None,
            "dev": result.device or None,
            "code": result.code_version or None,
            "secs": result.seconds,
            "info": result.details or None,
            "owner": owner,
            "now": now,
        }
        for job_id, attempt, result in results
    ]
    with engine.begin() as conn:
        # Every fenced UPDATE in one executemany. The count says whether every fence
        # held (the usual case); if not, the rows that were ours are the ones this very
        # statement marked done: nothing else writes our owner with this ``now``.
        if conn.execute(_FINISH, rows).rowcount == len(rows):
            stored = [(job_id, result) for job_id, _, result in results]
        else:
            held = set()
            for part in _chunks([job_id for job_id, _, _ in results]):
                params = {"ids": part, "owner": owner, "now": now}
                held.update(conn.execute(_FINISHED_NOW, params).scalars())
            stored = [(job_id, result) for job_id, _, result in results if job_id in held]
        ids = [job_id for job_id, _ in stored]
        for part in _chunks(ids):
            for delete in _CLEAR_ROWS:
                conn.execute(delete, {"ids": part})
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
