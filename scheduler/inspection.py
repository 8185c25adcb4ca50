"""Reading the state of the queue and of one job, for ``gauntlet queue`` and ``gauntlet job``.

Nothing here writes. The queue's state comes from both sides: the stream (length,
entries handed out and not yet acknowledged, dead letters) and SQL (what is waiting,
what the reconciler would repair). A job's live progress is what its worker publishes
to Redis while it runs; the rest of a job is SQL.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job, JobStatus, MetricRow, Model, utcnow
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.enqueue import marker_time
from gauntlet.scheduler.operator import dead_letters
from gauntlet.scheduler.queue import progress_key
from gauntlet.scheduler.reconcile import find_stranded

_ENTRY_ID = re.compile(r"^(\d+)-\d+$")


def entry_time(entry_id: str | None) -> datetime | None:
    """When a stream entry (or an enqueue marker) was written: its id says so."""
    match = _ENTRY_ID.match(entry_id or "")
    if match:
        return datetime.fromtimestamp(int(match.group(1)) / 1000, tz=timezone.utc)
    return marker_time(entry_id)


def _age(since: datetime | None, now: datetime) -> float | None:
    return None if since is None else round(max(0.0, (now - since).total_seconds()), 3)


def _pending(queue) -> tuple[int, dict[str, int]]:
    """Entries handed out and not acknowledged, in all and per consumer (one XPENDING)."""
    summary = queue.client.xpending(queue.stream, queue.group)
    consumers = {
        str(c["name"]): int(c["pending"]) for c in summary.get("consumers") or [] if c["pending"]
    }
    return int(summary["pending"]), consumers


def _oldest_queued(engine, now: datetime) -> dict | None:
    """The queued job that has waited longest, counted from its enqueue.

    A rerun keeps its creation date, so the time its entry was written (the entry id's
    timestamp) is what says how long it has waited; a job with no entry yet counts from
    its creation.
    """
    stmt = sa.select(Job.id, Job.stream_id, Job.created_at).where(Job.status == JobStatus.queued)
    oldest = None
    with engine.connect() as conn:
        for job_id, stream_id, created_at in conn.execute(stmt):
            since = entry_time(stream_id) or created_at
            if oldest is None or since < oldest[1]:
                oldest = (job_id, since)
    if oldest is None:
        return None
    return {"id": oldest[0], "age_seconds": _age(oldest[1], now)}


def status_counts(engine) -> dict[str, int]:
    stmt = sa.select(Job.status, sa.func.count()).group_by(Job.status)
    with engine.connect() as conn:
        counts = {str(getattr(s, "value", s)): int(n) for s, n in conn.execute(stmt)}
    return {s.value: counts.get(s.value, 0) for s in JobStatus}


def queue_state(app, now: datetime | None = None) -> dict:
    """Stream length, pending entries, dead letters, the oldest wait and stranded jobs."""
    now = now or utcnow()
    queue = app.queue
    queue.ensure_group()  # a flushed Redis lost the group: report an empty one
    # SQL before the stream, as the reconciler reads them, so nothing just written is
    # reported stranded.
    stranded = find_stranded(
        app.engine, queue, grace_seconds=max(app.settings.lease_seconds, 1.0), now=now
    )
    pending, consumers = _pending(queue)
    letters = []
    for letter in dead_letters(queue):
        letter["age_seconds"] = _age(entry_time(letter["dead_id"]), now)
        letters.append(letter)
    return {
        "stream": queue.stream,
        "length": int(queue.client.xlen(queue.stream)),
        "pending": pending,
        "pending_by_consumer": consumers,
        "jobs": status_counts(app.engine),
        "oldest_queued": _oldest_queued(app.engine, now),
        "dead_letters": letters,
        "stranded": [
            {
                "id": s.job_id,
                "status": s.status,
                "stream_id": s.stream_id,
                "attempts": s.attempts,
                "reason": s.reason,
            }
            for s in stranded
        ],
    }


def read_progress(app, job: dict, now: datetime | None = None) -> dict | None:
    """Points done of n, elapsed and time left of a running job; None if it has none.

    Elapsed runs from this attempt's start. The time left assumes the pace so far
    holds; a job that resumed from a checkpoint starts with points done, so its first
    estimates are optimistic.
    """
    if job["status"] != JobStatus.running:
        return None
    raw = app.redis.hgetall(progress_key(app.settings.redis_prefix, job["id"]))
    try:
        done, total = int(raw["done"]), int(raw["total"])
    except (KeyError, TypeError, ValueError):
        return None  # nothing published yet (or not by a worker of ours)
    elapsed = _age(job.get("started_at"), now or utcnow())
    left = None
    if elapsed is not None and 0 < done <= total:
        left = round(elapsed * (total - done) / done, 3)
    return {
        "done": done,
        "total": total,
        "fraction": round(done / total, 4) if total else None,
        "elapsed_seconds": elapsed,
        "eta_seconds": left,
    }


_METRIC_COLUMNS = (
    MetricRow.name,
    MetricRow.value,
    MetricRow.n,
    MetricRow.ci_low,
    MetricRow.ci_high,
)


def job_detail(app, job_id: int) -> dict:
    """One job: every column, its metrics, its sub-tasks and, while it runs, progress.

    Redis is read only for a running job, so looking at a finished one needs SQL only.
    """
    job = lifecycle.get_job(app.engine, job_id)
    if job is None:
        raise GauntletError(f"there is no job {job_id}: `gauntlet jobs` lists them")
    stmt = sa.select(*_METRIC_COLUMNS).where(MetricRow.job_id == job_id).order_by(MetricRow.name)
    with app.engine.connect() as conn:
        metrics = [dict(row._mapping) for row in conn.execute(stmt)]
    detail = dict(job)
    detail["status"] = str(getattr(job["status"], "value", job["status"]))
    detail["metrics"] = metrics
    detail["subtasks"] = lifecycle.list_subtasks(app.engine, job_id)
    detail["progress"] = read_progress(app, job)
    return detail


def active_jobs(app, *, model: str | None = None, dataset: str | None = None) -> int:
    """Queued and running jobs (of ``model`` and ``dataset`` if given): what a watch waits on."""
    stmt = (
        sa.select(sa.func.count())
        .select_from(Job)
        .join(Model, Model.id == Job.model_id)
        .where(Job.status.in_([JobStatus.queued, JobStatus.running]))
    )
    if model:  # matched as ``gauntlet jobs --model`` matches it
        stmt = stmt.where(sa.or_(Model.id.startswith(model, autoescape=True), Model.name == model))
    if dataset:
        stmt = stmt.where(Job.dataset == dataset)
    with app.engine.connect() as conn:
        return int(conn.scalar(stmt))
