"""The job lifecycle in SQL: every transition is one transaction.

States: queued -> running -> done | failed, and running -> queued on a transient
failure. Schedulers race for jobs, so a claim is a compare-and-set UPDATE, and every
later write by the claimant is fenced by (status running, lease owner, attempt): a
scheduler whose lease lapsed and whose job another replica reclaimed can no longer
write anything, and its late result is dropped instead of overwriting the new one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job, JobStatus, MetricRow, Model, Outcome, SubTask, utcnow
from gauntlet.workers.results import JobResult

# JobStatus is re-exported: callers compare get_job()['status'] against it.

# Stays well under every backend's limit on bound parameters per statement.
_CHUNK = 500


@dataclass(frozen=True)
class NewJob:
    job_key: str
    model_id: str
    kind: str
    suite: str | None
    spec: dict
    dataset: str
    attack: str
    norm: str | None
    eps: float | None
    subset_key: str
    defense: str | None = None
    source_model_id: str | None = None


@dataclass(frozen=True)
class Claim:
    job_id: int
    attempt: int
    owner: str
    spec: dict
    model: dict  # id, name, arch, dataset, input_spec, weights_sha256


def _insert(engine: sa.Engine, table: sa.Table):
    """INSERT with ``on_conflict_do_nothing``: each backend has its own construct."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table)
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise GauntletError(f"unsupported database {engine.dialect.name!r}: use SQLite or PostgreSQL")


def upsert_model(
    engine: sa.Engine,
    *,
    id: str,
    name: str,
    arch: str,
    dataset: str,
    input_spec: dict,
    weights_sha256: str,
    parent_id: str | None = None,
    **columns: Any,  # the owner, public and the like, stored as given
) -> bool:
    """Insert a model; True if it is new. An existing id is left as it is (same content)."""
    stmt = _insert(engine, Model.__table__).values(
        id=id,
        name=name,
        arch=arch,
        dataset=dataset,
        input_spec=input_spec,
        weights_sha256=weights_sha256,
        parent_id=parent_id,
        created_at=utcnow(),
        **columns,
    )
    with engine.begin() as conn:
        # RETURNING, not rowcount: SQLAlchemy does not keep an INSERT's rowcount (-1 on
        # psycopg) unless asked to.
        stmt = stmt.on_conflict_do_nothing(index_elements=["id"]).returning(Model.id)
        return conn.execute(stmt).first() is not None


def insert_jobs(engine: sa.Engine, jobs: list[NewJob]) -> list[int]:
    """Insert jobs whose key has no row yet; the ids of the rows inserted, in input order.

    ON CONFLICT DO NOTHING (not select-then-insert) so that two submits of the same
    model racing each other still insert each job once, without an IntegrityError.
    """
    unique = list({job.job_key: job for job in jobs}.values())
    if not unique:
        return []
    now = utcnow()
    rows = [dict(vars(job), status=JobStatus.queued, attempts=0, created_at=now) for job in unique]
    stmt = _insert(engine, Job.__table__).on_conflict_do_nothing(index_elements=["job_key"])
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        for start in range(0, len(rows), _CHUNK):
            result = conn.execute(stmt.returning(Job.id, Job.job_key), rows[start : start + _CHUNK])
            ids.update({key: job_id for job_id, key in result})
    return [ids[job.job_key] for job in unique if job.job_key in ids]


def unenqueued_jobs(engine: sa.Engine) -> list[int]:
    """Queued jobs with no stream entry: a submit crashed between INSERT and XADD."""
    stmt = sa.select(Job.id).where(Job.status == JobStatus.queued, Job.stream_id.is_(None))
    with engine.connect() as conn:
        return list(conn.scalars(stmt.order_by(Job.id)))


def mark_enqueued(engine: sa.Engine, job_id: int, stream_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == job_id).values(stream_id=stream_id))


def _model_dict(model: Model | sa.Row) -> dict[str, Any]:
    keys = ("id", "name", "arch", "dataset", "input_spec", "weights_sha256")
    return {key: getattr(model, key) for key in keys}


def get_model(engine: sa.Engine, model_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(Model).where(Model.id == model_id)).first()
    return None if row is None else _model_dict(row)


def claim(
    engine: sa.Engine, job_id: int, owner: str, lease_seconds: float, now: datetime | None = None
) -> Claim | None:
    """Take a queued job, or a running one whose lease expired; None if someone has it.

    One conditional UPDATE is the compare-and-set (``bulk.claim_many``, for one job): on
    PostgreSQL a concurrent claimant blocks on the row lock and then re-checks the WHERE
    against the committed row; on SQLite writers are serialized by the database lock.
    """
    from gauntlet.scheduler.bulk import claim_many  # it builds on this module

    return claim_many(engine, [job_id], owner, lease_seconds, now).get(job_id)


def _fenced(job_id: int, owner: str, attempt: int) -> sa.Update:
    """An UPDATE that only touches the job while this claimant still holds it."""
    return sa.update(Job).where(
        Job.id == job_id,
        Job.status == JobStatus.running,
        Job.lease_owner == owner,
        Job.attempts == attempt,
    )


def renew(
    engine: sa.Engine,
    job_id: int,
    owner: str,
    attempt: int,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Extend our lease; False if the job is no longer ours."""
    now = now or utcnow()
    stmt = _fenced(job_id, owner, attempt).values(
        lease_expires_at=now + timedelta(seconds=lease_seconds)
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def _check_result(result: JobResult) -> None:
    size = (result.n + 7) // 8
    if result.n < 0 or len(result.clean) != size or len(result.robust) != size:
        raise ValueError(
            f"Expected outcome bitsets of {size} bytes for n={result.n}, but got "
            f"{len(result.clean)} (clean) and {len(result.robust)} (robust)"
        )


def finish(
    engine: sa.Engine,
    job_id: int,
    owner: str,
    attempt: int,
    result: JobResult,
    now: datetime | None = None,
) -> bool:
    """Store a result and mark the job done, in one transaction; False if fenced out.

    Metric and outcome rows are replaced, not added to, so rerunning a job (a new
    attempt after a requeue) leaves exactly one set of rows.
    """
    _check_result(result)
    now = now or utcnow()
    stmt = _fenced(job_id, owner, attempt).values(
        status=JobStatus.done,
        finished_at=now,
        lease_expires_at=None,
        worker_host=result.worker_host or None,
        device=result.device or None,
        code_version=result.code_version or None,
        seconds=result.seconds,
        details=result.details or None,
        error=None,
    )
    metrics = [
        dict(job_id=job_id, name=m.name, value=float(m.value), n=m.n, ci_low=m.low, ci_high=m.high)
        for m in result.metrics
    ]
    with engine.begin() as conn:
        # The fence first: it takes the row (or the database) lock before any write.
        if conn.execute(stmt).rowcount != 1:
            return False
        conn.execute(sa.delete(MetricRow).where(MetricRow.job_id == job_id))
        conn.execute(sa.delete(Outcome).where(Outcome.job_id == job_id))
        if metrics:
            conn.execute(sa.insert(MetricRow), metrics)
        conn.execute(
            sa.insert(Outcome).values(
                job_id=job_id, n=result.n, clean=bytes(result.clean), robust=bytes(result.robust)
            )
        )
        conn.execute(sa.delete(SubTask).where(SubTask.job_id == job_id))
        if result.subtasks:
            conn.execute(
                sa.insert(SubTask),
                [{"job_id": job_id, **asdict(record)} for record in result.subtasks],
            )
    return True


_SUBTASK_COLUMNS = ("name", "node_id", "worker_pid", "gpu_ids", "started_at", "finished_at")


def list_subtasks(engine: sa.Engine, job_id: int) -> list[dict]:
    """The recorded sub-tasks of a job, in start order."""
    columns = [getattr(SubTask, key) for key in _SUBTASK_COLUMNS]
    stmt = sa.select(*columns).where(SubTask.job_id == job_id).order_by(SubTask.started_at)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]


def fail(
    engine: sa.Engine,
    job_id: int,
    owner: str,
    attempt: int,
    message: str,
    *,
    permanent: bool,
    now: datetime | None = None,
) -> bool:
    """Record a failure; False if fenced out.

    Permanent: the job is failed for good. Transient: it goes back to queued with the
    lease cleared (anyone may claim it again) and keeps the message for display. Its
    stream entry is left as it is: the dispatcher retries through that entry.
    """
    now = now or utcnow()
    if permanent:
        values = {"status": JobStatus.failed, "finished_at": now}
    else:
        values = {"status": JobStatus.queued, "lease_owner": None}
    stmt = _fenced(job_id, owner, attempt).values(error=message, lease_expires_at=None, **values)
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def fail_dead_lettered(engine: sa.Engine, job_id: int, message: str) -> None:
    """Fail a job whose stream entry exceeded its deliveries, whoever holds the lease.

    A job that is already done keeps its result: a late dead-letter must not undo it.
    """
    stmt = (
        sa.update(Job)
        .where(Job.id == job_id, Job.status != JobStatus.done)
        .values(status=JobStatus.failed, error=message, finished_at=utcnow(), lease_expires_at=None)
    )
    with engine.begin() as conn:
        conn.execute(stmt)


def requeue(engine: sa.Engine, job_id: int) -> bool:
    """Put a finished (done or failed) job back to queued for a rerun.

    ``stream_id`` is cleared, so the next ``unenqueued_jobs`` sweep enqueues it again;
    its old results stay visible until the rerun's ``finish`` replaces them.
    """
    stmt = (
        sa.update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.done, JobStatus.failed]))
        .values(
            status=JobStatus.queued,
            stream_id=None,
            failures=0,  # a rerun starts with its retries whole
            lease_owner=None,
            lease_expires_at=None,
            finished_at=None,
        )
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


_JOB_COLUMNS = [column for column in Job.__table__.columns if column.key != "spec"]


def get_job(engine: sa.Engine, job_id: int) -> dict[str, Any] | None:
    """Every column of one job (spec included) and its model's name; None if absent."""
    stmt = (
        sa.select(Job.__table__, Model.name.label("model"))
        .join(Model, Model.id == Job.model_id)
        .where(Job.id == job_id)
    )
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    return None if row is None else dict(row._mapping)


def job_status(engine: sa.Engine, job_id: int) -> JobStatus:
    with engine.connect() as conn:
        status = conn.scalar(sa.select(Job.status).where(Job.id == job_id))
    if status is None:
        raise GauntletError(f"there is no job {job_id}: `gauntlet jobs` lists them")
    return status


def list_jobs(
    engine: sa.Engine,
    *,
    status: JobStatus | str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    limit: int | None = 200,
    where: sa.ColumnElement[bool] | None = None,
) -> list[dict[str, Any]]:
    """Newest first, no spec; ``model`` is an id prefix or a name, ``where`` one more clause."""
    stmt = sa.select(*_JOB_COLUMNS, Model.name.label("model")).join(Model, Model.id == Job.model_id)
    stmt = stmt if where is None else stmt.where(where)
    if status is not None:
        stmt = stmt.where(Job.status == JobStatus(status))
    if model:
        stmt = stmt.where(sa.or_(Model.id.startswith(model, autoescape=True), Model.name == model))
    if dataset:
        stmt = stmt.where(Job.dataset == dataset)
    stmt = stmt.order_by(Job.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]


def done_job_keys(engine: sa.Engine, keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` that already have a job row, whatever its status."""
    keys = list(dict.fromkeys(keys))
    found: set[str] = set()
    with engine.connect() as conn:
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            found.update(conn.scalars(sa.select(Job.job_key).where(Job.job_key.in_(chunk))))
    return found


def list_models(engine: sa.Engine) -> list[dict[str, Any]]:
    stmt = sa.select(Model.__table__).order_by(Model.created_at, Model.id)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]
