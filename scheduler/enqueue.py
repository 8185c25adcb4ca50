"""Putting a job on the stream at most once per attempt: a compare-and-set on stream_id.

Submits, nightly runs and the reconciler may decide at the same moment that one job
needs a stream entry. Each of them first swaps the row's ``stream_id`` from the value it
read to a marker of its own, in one conditional UPDATE; only the one whose UPDATE matched
XADDs, and then swaps its marker for the real entry id. The marker holds the time it was
written, so the reconciler can tell an enqueue that is under way (a young marker) from
one whose process died between the two writes (a marker older than the grace period).
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from gauntlet.db.schema import Job, JobStatus, utcnow
from gauntlet.scheduler.queue import JobQueue

MARKER = "pending:"
# Rows per statement of a batch enqueue: under every backend's bound-parameter limit.
BATCH = 500


def new_marker() -> str:
    """``pending:<unix ms>:<random>``: unique per try, and dated for the reconciler."""
    return f"{MARKER}{int(time.time() * 1000)}:{uuid.uuid4().hex[:12]}"


def marker_time(stream_id: str | None) -> datetime | None:
    """When a marker was written; None for a real entry id, NULL or a garbled marker."""
    if not stream_id or not stream_id.startswith(MARKER):
        return None
    try:
        millis = int(stream_id[len(MARKER) :].split(":", 1)[0])
    except ValueError:
        return None
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc)


def _same_stream_id(seen: str | None):
    return Job.stream_id.is_(None) if seen is None else Job.stream_id == seen


def enqueue_once(
    engine: sa.Engine,
    queue: JobQueue,
    job_id: int,
    *,
    seen: str | None,
    requeue_attempt: int | None = None,
    now: datetime | None = None,
) -> str | None:
    """XADD ``job_id`` if its row still holds ``seen`` as stream_id; the entry id or None.

    The job must be queued; with ``requeue_attempt``, it must instead be running at that
    attempt with its lease expired, and it goes back to queued in the same UPDATE (a
    running job whose scheduler died and whose entry is gone). None means another
    enqueuer won the row, or the job moved on (claimed, finished) meanwhile.
    """
    now = now or utcnow()
    marker = new_marker()
    stmt = sa.update(Job).where(Job.id == job_id, _same_stream_id(seen))
    if requeue_attempt is None:
        stmt = stmt.where(Job.status == JobStatus.queued).values(stream_id=marker)
    else:
        stmt = stmt.where(
            Job.status == JobStatus.running,
            Job.attempts == requeue_attempt,
            Job.lease_expires_at < now,
        ).values(stream_id=marker, status=JobStatus.queued, lease_owner=None, lease_expires_at=None)
    with engine.begin() as conn:
        if conn.execute(stmt).rowcount != 1:
            return None
    try:
        entry_id = queue.enqueue(job_id)
    except Exception:
        # Hand the row back so the next enqueuer need not wait out the grace period.
        with engine.begin() as conn:
            conn.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.stream_id == marker)
                .values(stream_id=seen)
            )
        raise
    # Our marker, or our own entry id if the reconciler already adopted it.
    final = (
        sa.update(Job)
        .where(Job.id == job_id, Job.stream_id.in_([marker, entry_id]))
        .values(stream_id=entry_id)
    )
    with engine.begin() as conn:
        won = conn.execute(final).rowcount == 1
    if not won:
        # We stalled past the grace period and the reconciler gave the job another
        # entry: ours is the duplicate, so take it back.
        queue.client.xdel(queue.stream, entry_id)
        return None
    return entry_id


def adopt(engine: sa.Engine, job_id: int, seen: str | None, entry_id: str) -> bool:
    """Point the row at an entry already in the stream (written, but never recorded)."""
    stmt = sa.update(Job).where(Job.id == job_id, _same_stream_id(seen)).values(stream_id=entry_id)
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def stale(stream_id: str | None, grace_seconds: float, now: datetime | None = None) -> bool:
    """Whether a marker is older than the grace period (its writer is presumed dead)."""
    written = marker_time(stream_id)
    if written is None:
        return False
    return written < (now or utcnow()) - timedelta(seconds=grace_seconds)


def enqueue_fresh(engine: sa.Engine, queue: JobQueue, job_ids: list[int]) -> list[int]:
    """``enqueue_once(..., seen=None)`` for many queued jobs at once; the ids enqueued.

    The same compare-and-set, a batch per statement: one UPDATE swaps NULL for this
    batch's marker on the rows still unenqueued (a racing enqueuer wins the others), one
    pipeline XADDs them, and one transaction swaps the marker for each entry id. A row
    the reconciler re-enqueued meanwhile keeps its entry, and ours is deleted.
    """
    marker = new_marker()
    won: list[int] = []
    with engine.begin() as conn:
        for start in range(0, len(job_ids), BATCH):
            part = job_ids[start : start + BATCH]
            stmt = (
                sa.update(Job)
                .where(Job.id.in_(part), Job.stream_id.is_(None), Job.status == JobStatus.queued)
                .values(stream_id=marker)
                .returning(Job.id)
            )
            won.extend(conn.execute(stmt).scalars())
    if not won:
        return []
    won.sort()
    try:
        entry_ids = queue.enqueue_many(won)
    except Exception:
        with engine.begin() as conn:  # hand the rows back, as enqueue_once does
            stmt = sa.update(Job).where(Job.stream_id == marker).values(stream_id=None)
            conn.execute(stmt)
        raise
    # Core, not ORM: an ORM UPDATE with a list of parameters means "by primary key".
    jobs = Job.__table__
    final = (
        sa.update(jobs)
        .where(
            jobs.c.id == sa.bindparam("jid"), jobs.c.stream_id.in_([marker, sa.bindparam("eid")])
        )
        .values(stream_id=sa.bindparam("eid"))
    )
    with engine.begin() as conn:
        pairs = list(zip(won, entry_ids, strict=True))
        conn.execute(final, [{"jid": j, "eid": e} for j, e in pairs])
        rows = []
        for start in range(0, len(won), BATCH):
            part = won[start : start + BATCH]
            rows += conn.execute(sa.select(Job.id, Job.stream_id).where(Job.id.in_(part))).all()
    held = {job_id: stream_id for job_id, stream_id in rows}
    lost = [e for j, e in pairs if held.get(j) != e]
    if lost:
        queue.client.xdel(queue.stream, *lost)
    return [j for j, e in pairs if held.get(j) == e]
