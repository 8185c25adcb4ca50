"""What an operator does to jobs by hand: cancel them and run them again.

SQL decides, the stream follows. Cancelling is one conditional UPDATE from queued or
running to failed; a scheduler that holds a cancelled job finds at its next fenced
write (a lease renewal, its result) that the row is no longer running under its
lease, and drops what it was doing. Only then are the job's stream entries removed:
an entry that a scheduler reads in between names a failed job, which it acknowledges
without running.

A rerun puts a finished job back to queued through ``lifecycle.requeue`` (which also
gives it back its retries) and enqueues it through ``enqueue.enqueue_once``, the same
compare-and-set every other enqueuer uses, so a reconciler that notices the requeued
row at the same moment still leaves it one entry. The attempt counter is not reset:
it is half of the fence that keeps a scheduler still holding an old attempt from
writing over the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job, JobStatus, MetricRow, Outcome, SubTask, utcnow
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.enqueue import enqueue_once
from gauntlet.scheduler.queue import JobQueue
from gauntlet.scheduler.reconcile import stream_entries
from gauntlet.scheduler.train import find_model

CANCELLED = "cancelled by the operator"
_ACTIVE = (JobStatus.queued, JobStatus.running)
_FINISHED = (JobStatus.done, JobStatus.failed)


@dataclass
class CancelReport:
    cancelled: list[int] = field(default_factory=list)
    # {"id", "status"} of each named job that had already finished.
    not_cancellable: list[dict] = field(default_factory=list)
    entries_removed: int = 0


@dataclass
class RerunReport:
    # {"id", "entry"}: entry is None when a concurrent enqueuer gave the job its entry.
    rerun: list[dict] = field(default_factory=list)
    # {"id", "status"} of each selected job that was queued or running already.
    not_rerun: list[dict] = field(default_factory=list)
    dead_letters_removed: int = 0
    # Dead letters that name no job in the database (malformed or orphaned entries).
    dead_letters_skipped: list[dict] = field(default_factory=list)


def _status(value) -> str:
    return str(getattr(value, "value", value))


def job_statuses(engine: sa.Engine, job_ids) -> dict[int, JobStatus]:
    """The status of each job, in the order given; an unknown id is an error."""
    ids = list(dict.fromkeys(int(j) for j in job_ids))
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    missing = [j for j in ids if j not in rows]
    if missing:
        named = ", ".join(map(str, missing))
        raise GauntletError(f"there is no job {named}: `gauntlet jobs` lists them")
    return {j: JobStatus(rows[j]) for j in ids}


def _model_jobs(engine: sa.Engine, ref: str, statuses) -> dict[int, JobStatus]:
    model = find_model(engine, ref)
    stmt = sa.select(Job.id, Job.status).where(
        Job.model_id == model["id"], Job.status.in_(statuses)
    )
    with engine.connect() as conn:
        return {job_id: JobStatus(s) for job_id, s in conn.execute(stmt.order_by(Job.id))}


def remove_entries(queue: JobQueue, job_ids) -> int:
    """Acknowledge and delete every stream entry that names one of ``job_ids``.

    Every entry, not only the one the row records: a duplicate or an adopted entry
    would deliver the job just the same. The stream holds only unfinished work, so
    scanning it is cheap.
    """
    wanted = set(job_ids)
    doomed = [entry for entry, job_id in stream_entries(queue).items() if job_id in wanted]
    if doomed:
        pipe = queue.client.pipeline(transaction=True)
        pipe.xack(queue.stream, queue.group, *doomed)
        pipe.xdel(queue.stream, *doomed)
        pipe.execute()
    return len(doomed)


def cancel_job(engine: sa.Engine, job_id: int) -> bool:
    """Fail a queued or running job with ``CANCELLED``; False if it had finished.

    The lease owner is kept, so the row still shows who was running it; the status
    alone already makes every fenced write of that owner miss.
    """
    stmt = (
        sa.update(Job)
        .where(Job.id == job_id, Job.status.in_(_ACTIVE))
        .values(
            status=JobStatus.failed,
            error=CANCELLED,
            finished_at=utcnow(),
            lease_expires_at=None,
        )
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def cancel(app, job_ids=(), *, model: str | None = None) -> CancelReport:
    """Cancel the named jobs, or every queued and running job of ``model``."""
    if not job_ids and not model:
        raise GauntletError("name the jobs to cancel, or give --model")
    targets: dict[int, JobStatus] = {}
    if job_ids:
        targets.update(job_statuses(app.engine, job_ids))
    if model:
        targets.update(_model_jobs(app.engine, model, _ACTIVE))
    report = CancelReport()
    for job_id, status in targets.items():
        if status in _ACTIVE and cancel_job(app.engine, job_id):
            report.cancelled.append(job_id)
        else:
            # Finished before, or while, we looked: say what it is now.
            now = lifecycle.job_status(app.engine, job_id)
            report.not_cancellable.append({"id": job_id, "status": _status(now)})
    if report.cancelled:
        report.entries_removed = remove_entries(app.queue, report.cancelled)
    return report


def dead_letters(queue: JobQueue) -> list[dict]:
    """The dead-letter stream with each letter's own id (``dead_id``), oldest first."""
    letters = []
    for dead_id, fields in queue.client.xrange(queue.dead_stream):
        letter = {_text(k): _text(v) for k, v in (fields or {}).items()}
        for key in ("job_id", "deliveries"):
            if str(letter.get(key, "")).lstrip("-").isdigit():
                letter[key] = int(letter[key])
        letters.append({"dead_id": _text(dead_id), **letter})
    return letters


def _clear_failed_attempt(app, job_id: int) -> None:
    """Drop what a failed attempt left: its message, its rows and its checkpoint.

    Done while the job is still finished, so no scheduler writes its rows meanwhile. A
    done job (rerun with force) keeps its result until the new one replaces it.
    """
    stmt = (
        sa.update(Job)
        .where(Job.id == job_id, Job.status.in_(_FINISHED))
        .values(error=None)
        .returning(Job.status)
    )
    with app.engine.begin() as conn:
        status = conn.execute(stmt).scalar()
        if status is None or JobStatus(status) != JobStatus.failed:
            return
        for table in (MetricRow, Outcome, SubTask):
            conn.execute(sa.delete(table).where(table.job_id == job_id))
    # The partial per-example state of the failed attempt: a rerun (often after a fix)
    # starts from the first point instead of resuming what the old code computed.
    from gauntlet.workers.checkpoint import Checkpoint

    try:
        Checkpoint(app.settings.artifacts, f"job-{job_id}").clear()
    except OSError:
        pass  # an artifact store this host cannot write: the worker resumes instead


def _select_reruns(app, job_ids, failed: bool, dead: bool, report: RerunReport):
    targets: dict[int, JobStatus] = {}
    if job_ids:
        targets.update(job_statuses(app.engine, job_ids))
    if failed:
        stmt = sa.select(Job.id).where(Job.status == JobStatus.failed).order_by(Job.id)
        with app.engine.connect() as conn:
            targets.update({job_id: JobStatus.failed for job_id in conn.scalars(stmt)})
    if dead:
        letters = dead_letters(app.queue)
        named = [x["job_id"] for x in letters if isinstance(x.get("job_id"), int)]
        with app.engine.connect() as conn:
            known = set(conn.scalars(sa.select(Job.id).where(Job.id.in_(named))))
        for letter in letters:
            if letter.get("job_id") in known:
                targets.setdefault(letter["job_id"], None)
            else:
                report.dead_letters_skipped.append(letter)
        missing = [j for j, s in targets.items() if s is None]
        targets.update(job_statuses(app.engine, missing) if missing else {})
    return targets


def rerun(
    app, job_ids=(), *, failed: bool = False, dead: bool = False, force: bool = False
) -> RerunReport:
    """Queue finished jobs again: the named ones, every failed one, every dead-lettered one.

    A done job is rerun only with ``force``: it recomputes a result the leaderboard
    already shows. Refused before anything changes, so a refusal leaves no half-rerun.
    """
    if not job_ids and not failed and not dead:
        raise GauntletError("name the jobs to rerun, or give --failed or --dead")
    report = RerunReport()
    targets = _select_reruns(app, job_ids, failed, dead, report)
    done = [job_id for job_id, status in targets.items() if status == JobStatus.done]
    if done and not force:
        named = ", ".join(map(str, done))
        raise GauntletError(
            f"job {named} is done: a rerun recomputes its result; add --force to rerun it"
        )
    finished = [job_id for job_id, status in targets.items() if status in _FINISHED]
    for job_id, status in targets.items():
        if status not in _FINISHED:
            report.not_rerun.append({"id": job_id, "status": _status(status)})
    # Entries left for a finished job would deliver it a second time once it is queued.
    remove_entries(app.queue, finished)
    for job_id in finished:
        _clear_failed_attempt(app, job_id)
        if not lifecycle.requeue(app.engine, job_id):
            now = lifecycle.job_status(app.engine, job_id)  # another operator was first
            report.not_rerun.append({"id": job_id, "status": _status(now)})
            continue
        entry = enqueue_once(app.engine, app.queue, job_id, seen=None)
        report.rerun.append({"id": job_id, "entry": entry})
    rerun_ids = {r["id"] for r in report.rerun}
    buried = [x["dead_id"] for x in dead_letters(app.queue) if x.get("job_id") in rerun_ids]
    if buried:
        app.queue.client.xdel(app.queue.dead_stream, *buried)
    report.dead_letters_removed = len(buried)
    return report


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
