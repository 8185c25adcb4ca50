"""The reconciler: SQL is the source of truth, the stream only delivers.

A job that SQL says is waiting must have a live entry in the stream, or nothing will
ever run it: the entry can be lost to a flushed or failed-over Redis, a submit that died
between INSERT and XADD, or an enqueuer that died between its two writes. ``repair``
finds those jobs and gives each one entry, through the same compare-and-set as every
other enqueuer (``enqueue.enqueue_once``), so a repair racing a submit, a nightly run or
another repair still XADDs each job once.

What counts as stranded:

- a ``queued`` job whose ``stream_id`` is NULL, names an entry that is not in the stream,
  or is an enqueue marker older than the grace period;
- a ``running`` job whose lease expired and whose entry is not in the stream (its
  scheduler died, and the entry that would let a reaper retry it is gone): it goes back
  to ``queued`` and gets a new entry.

SQL is read *before* the stream is scanned. An id that SQL already holds was XADDed
before that read, so if the scan does not find it, it really is gone; an entry written
after the read belongs to a row that the compare-and-set will no longer match.

Schedulers run it when they start and then once per lease period, one replica at a time
(a Redis lease that is left to expire, so the replicas share one repair per period).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from gauntlet.db.schema import Job, JobStatus, utcnow
from gauntlet.scheduler.enqueue import adopt, enqueue_once, marker_time, stale
from gauntlet.scheduler.lease import Lease
from gauntlet.scheduler.queue import JobQueue

log = logging.getLogger(__name__)

LOCK_NAME = "reconcile"
# A marker this old means its enqueuer died between its two writes. Enqueueing takes
# milliseconds, so a minute is far beyond any live one (the default lease, too).
DEFAULT_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class Stranded:
    job_id: int
    status: str  # "queued" or "running"
    stream_id: str | None  # as SQL had it
    attempts: int
    reason: str
    # An entry for this job that is in the stream under another id (XADDed, but its id
    # never written back): adopted instead of adding one more.
    found_entry: str | None = None


@dataclass
class RepairReport:
    enqueued: list[int] = field(default_factory=list)
    adopted: list[int] = field(default_factory=list)
    # Found stranded, but someone else fixed the row first (or it moved on).
    raced: list[int] = field(default_factory=list)

    @property
    def repaired(self) -> int:
        return len(self.enqueued) + len(self.adopted)


def _candidates(engine: sa.Engine, now: datetime) -> list[sa.Row]:
    expired = sa.and_(Job.status == JobStatus.running, Job.lease_expires_at < now)
    stmt = (
        sa.select(Job.id, Job.status, Job.stream_id, Job.attempts)
        .where(sa.or_(Job.status == JobStatus.queued, expired))
        .order_by(Job.id)
    )
    with engine.connect() as conn:
        return list(conn.execute(stmt))


def stream_entries(queue: JobQueue, page: int = 1000) -> dict[str, int]:
    """Every entry id in the stream and the job it names, in a few paged XRANGEs.

    The stream holds only unfinished work (acking deletes), so this is small.
    """
    entries: dict[str, int] = {}
    low = "-"
    while True:
        batch = queue.client.xrange(queue.stream, low, "+", count=page)
        for entry_id, fields in batch:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            raw = (fields or {}).get("job_id", (fields or {}).get(b"job_id"))
            try:
                entries[entry_id] = int(raw.decode() if isinstance(raw, bytes) else raw)
            except (TypeError, ValueError):
                continue  # malformed: the queue buries it when it is read
        if len(batch) < page:
            return entries
        low = f"({entry_id}"


def find_stranded(
    engine: sa.Engine,
    queue: JobQueue,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    now: datetime | None = None,
) -> list[Stranded]:
    """Jobs SQL says are waiting (or abandoned) that no stream entry will deliver."""
    now = now or utcnow()
    rows = _candidates(engine, now)  # first: see the module's docstring
    entries = stream_entries(queue)
    by_job: dict[int, str] = {}
    for entry_id, job_id in entries.items():
        by_job.setdefault(job_id, entry_id)
    stranded = []
    for row in rows:
        status = str(getattr(row.status, "value", row.status))
        if row.stream_id in entries:
            continue  # live: waiting, or pending for a reaper to take
        if marker_time(row.stream_id) is not None and not stale(row.stream_id, grace_seconds, now):
            continue  # an enqueue under way right now
        if row.stream_id is None:
            reason = "never enqueued"
        elif marker_time(row.stream_id) is not None:
            reason = "its enqueuer died before recording the entry"
        else:
            reason = f"entry {row.stream_id} is gone from the stream"
        if status == "running":
            reason = f"lease expired and {reason}"
        stranded.append(
            Stranded(row.id, status, row.stream_id, row.attempts, reason, by_job.get(row.id))
        )
    return stranded


def repair(
    engine: sa.Engine,
    queue: JobQueue,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    now: datetime | None = None,
) -> RepairReport:
    """Give every stranded job exactly one live entry; safe to run from several places."""
    now = now or utcnow()
    report = RepairReport()
    queue.ensure_group()  # a flushed Redis lost the group too
    for job in find_stranded(engine, queue, grace_seconds=grace_seconds, now=now):
        if job.found_entry is not None:
            done = adopt(engine, job.job_id, job.stream_id, job.found_entry)
            (report.adopted if done else report.raced).append(job.job_id)
            continue
        attempt = job.attempts if job.status == "running" else None
        entry = enqueue_once(
            engine, queue, job.job_id, seen=job.stream_id, requeue_attempt=attempt, now=now
        )
        (report.enqueued if entry else report.raced).append(job.job_id)
        if entry:
            log.warning("job %s re-enqueued as %s: %s", job.job_id, entry, job.reason)
    return report


def unfinished(engine: sa.Engine) -> int:
    """Jobs queued or running in SQL: what a draining scheduler still waits for."""
    stmt = sa.select(sa.func.count()).where(Job.status.in_([JobStatus.queued, JobStatus.running]))
    with engine.connect() as conn:
        return int(conn.scalar(stmt))


class Reconciler:
    """``repair`` when a scheduler starts and then once per period, one replica at a time."""

    def __init__(self, engine: sa.Engine, queue: JobQueue, *, every_seconds: float):
        self.engine = engine
        self.queue = queue
        self.every_seconds = every_seconds
        self.grace_seconds = max(every_seconds, 1.0)
        self._lock = Lease(
            queue.client, LOCK_NAME, max(1, int(every_seconds * 1000)), prefix=queue.prefix
        )
        self._last = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_seconds

    def run(self) -> RepairReport | None:
        """Repair now unless another replica did within this period (then None).

        The lock is never released: its expiry is what spaces repairs one period apart.
        """
        self._last = time.monotonic()
        if self._lock.acquire() is None:
            return None
        return repair(self.engine, self.queue, grace_seconds=self.grace_seconds)

    def maybe_run(self) -> RepairReport | None:
        return self.run() if self.due() else None


def repair_queue(app) -> RepairReport:
    """``repair`` for one process's ``App``: what ``gauntlet queue repair`` runs.

    The grace period is one lease, as the schedulers' own repairs use.
    """
    return repair(app.engine, app.queue, grace_seconds=max(app.settings.lease_seconds, 1.0))
