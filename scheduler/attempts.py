"""What a job's own failures cost it, counted in SQL rather than in stream deliveries.

A stream entry is delivered again whenever the scheduler holding it dies, so its
delivery count mixes the job's failures with its schedulers' crashes. Only the job's own
failures should use up its retries: each transient failure it reports adds one to
``jobs.failures`` (in the same fenced UPDATE that puts it back to queued), and the
failure that reaches the limit fails the job with its message. The delivery count is
left as a high safety net for an entry that keeps killing whoever runs it.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from gauntlet.db.schema import Job, JobStatus, utcnow
from gauntlet.scheduler.lifecycle import _fenced

# Deliveries of one entry before it is dead-lettered whatever SQL says: only an entry
# that crashes its scheduler every time (so never reports a failure) gets this far.
DELIVERY_SAFETY_NET = 50


def record_failure(
    engine: sa.Engine,
    job_id: int,
    owner: str,
    attempt: int,
    message: str,
    *,
    max_failures: int,
    now: datetime | None = None,
) -> tuple[bool, int] | None:
    """Count one transient failure; (given up?, failures so far), or None if fenced out.

    Below the limit the job goes back to queued with the message kept for display; at
    the limit it is failed, its message saying how many tries it had.
    """
    now = now or utcnow()
    count = Job.failures + 1
    give_up = count >= max_failures
    stmt = (
        _fenced(job_id, owner, attempt)
        .values(
            failures=count,
            status=sa.case((give_up, JobStatus.failed.value), else_=JobStatus.queued.value),
            finished_at=sa.case((give_up, now), else_=None),
            error=message,
            lease_owner=sa.case((give_up, Job.lease_owner), else_=None),
            lease_expires_at=None,
        )
        .returning(Job.failures)
    )
    with engine.begin() as conn:
        failures = conn.execute(stmt).scalar()
        if failures is None:
            return None
        gave_up = failures >= max_failures
        if gave_up:
            # The full text in Python: string building in SQL differs between backends.
            final = f"gave up after {failures} failures: {message}"
            conn.execute(sa.update(Job).where(Job.id == job_id).values(error=final))
    return gave_up, failures


def fail_job(engine: sa.Engine, job_id: int, message: str, *, keep_done: bool = True) -> bool:
    """Fail a job that could not be handled at all (unreadable row, result not storable).

    Not fenced: it may be called before any claim. A job that is done keeps its result,
    unless ``keep_done`` is off (a train job whose derived model could not be registered:
    what it was for did not happen, and failing it lets an operator see and rerun it).
    """
    stmt = sa.update(Job).where(Job.id == job_id)
    if keep_done:
        stmt = stmt.where(Job.status != JobStatus.done)
    stmt = stmt.values(
        status=JobStatus.failed, error=message, finished_at=utcnow(), lease_expires_at=None
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1
