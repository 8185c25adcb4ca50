"""How a dispatcher turns delivered stream entries into running tasks, a batch at a time.

For each entry: find its job, decide what the delivery means (run it; a duplicate of a
finished job, acknowledged; a job a live replica holds, left pending; a job delivered
too often, dead-lettered), claim what can run, and start it on the executor. A batch
costs one SELECT and one claiming UPDATE however many entries it has; the decisions
are the same as for a single entry.

Nothing one entry does may stop the others: an error while deciding or starting one
fails that job with the error stored (or, when the database or Redis is unreachable,
leaves the entry for later), and an error in a batch statement retries the batch one
entry at a time so that the entry that caused it fails alone.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from gauntlet.scheduler import bulk, deadlines, lifecycle
from gauntlet.scheduler.queue import Entry, progress_key
from gauntlet.workers.jobs import job_kind
from gauntlet.workers.results import JobFailure

if TYPE_CHECKING:  # the dispatcher imports this module
    from gauntlet.scheduler.dispatcher import Dispatcher

FINISHED = (lifecycle.JobStatus.done, lifecycle.JobStatus.failed)


def _lease_alive(job: dict) -> bool:
    expires = job.get("lease_expires_at")
    return expires is not None and expires > datetime.now(timezone.utc)


def handle_entries(d: Dispatcher, entries: list[Entry]) -> None:
    """Decide what each delivered entry means, and start the jobs that can run."""
    if not entries:
        return
    try:
        jobs = bulk.get_jobs(d.engine, [e.job_id for e in entries])
    except Exception as exc:  # noqa: BLE001 - one entry at a time isolates the cause
        if d.note_outage(exc):
            d.defer(entries)
            return
        for entry in entries:
            handle_entry(d, entry)
        return
    runnable: list[tuple[Entry, dict, tuple]] = []
    seen: set[int] = set()
    for entry in entries:
        if entry.job_id in seen:
            continue  # a second entry of one job in this batch: its first one decides
        seen.add(entry.job_id)
        try:
            job = triage(d, entry, jobs.get(entry.job_id))
            if job is not None:
                runnable.append((entry, job, prepare(d, job)))
        except Exception as exc:  # noqa: BLE001 - one entry must never stop the loop
            if d.note_outage(exc):
                d.defer([entry])
                continue
            d.writes.entry_error(entry, "could not start the job", exc)
    if not runnable:
        return
    try:
        claims = bulk.claim_many(
            d.engine, [entry.job_id for entry, _, _ in runnable], d.consumer, d.lease_seconds
        )
    except Exception as exc:  # noqa: BLE001 - as above
        if d.note_outage(exc):
            d.defer([entry for entry, _, _ in runnable])
            return
        for entry, _, _ in runnable:
            handle_entry(d, entry)
        return
    for entry, _job, prepared in runnable:
        claim = claims.get(entry.job_id)
        if claim is None:
            continue  # another replica took it between our read and our claim
        try:
            start(d, entry, claim, *prepared)
        except Exception as exc:  # noqa: BLE001 - as above
            d.writes.entry_error(entry, "could not start the job", exc)


def handle_entry(d: Dispatcher, entry: Entry) -> None:
    """One entry on its own: the same decisions, one statement each."""
    try:
        job = triage(d, entry, lifecycle.get_job(d.engine, entry.job_id))
        if job is None:
            return
        # Everything read before the claim: after it, nothing but starting the task may
        # happen, or an outage in between would strand a claimed job for a lease.
        prepared = prepare(d, job)
        claim = lifecycle.claim(d.engine, entry.job_id, d.consumer, d.lease_seconds)
        if claim is not None:
            start(d, entry, claim, *prepared)
    except Exception as exc:  # noqa: BLE001 - one entry must never stop the loop
        if d.note_outage(exc):
            d.defer([entry])  # handled again once it is back
            return
        d.writes.entry_error(entry, "could not start the job", exc)


def triage(d: Dispatcher, entry: Entry, job: dict | None) -> dict | None:
    """The job if it should be claimed and run; None when the entry was dealt with."""
    if job is None:
        d.writes.dead_letter(entry, f"no job {entry.job_id} in the database")
        return None
    if job["status"] in FINISHED:
        if job["status"] == lifecycle.JobStatus.done and job["kind"] == "train":
            d.writes.register_derived(job["id"])  # idempotent
        elif job["status"] == lifecycle.JobStatus.done and job["kind"] == "gate":
            d.writes.follow_on(job["id"])  # idempotent too
        d.writes.settle(entry)  # finished already: a duplicate or stale delivery
        d.stats.skipped += 1
        return None
    if job["status"] == lifecycle.JobStatus.running and _lease_alive(job):
        return None  # a live replica holds it; it acknowledges the entry when it finishes
    if job["id"] in d.running:
        return None  # ours already (a redelivery of an entry we are running)
    if entry.deliveries > d.delivery_limit:
        d.writes.dead_letter(entry, f"delivered {entry.deliveries} times without finishing")
        return None
    return job


def prepare(d: Dispatcher, job: dict) -> tuple[dict, float]:
    """What starting the job needs from SQL: the other models its kind loads, its limit."""
    spec = job["spec"]
    others = {
        model_id: lifecycle.get_model(d.engine, model_id)
        for model_id in job_kind(spec.get("kind", "eval")).models(spec)
    }
    return others, deadlines.limit_s(spec, d.max_job_seconds)


def start(d: Dispatcher, entry: Entry, claim: lifecycle.Claim, others: dict, limit: float):
    resources = claim.spec.get("resources") or {}
    num_gpus = float(resources.get("num_gpus") or 0)
    if num_gpus > d.max_gpus:
        outcome = JobFailure(
            f"the job asks for {num_gpus:g} GPUs but the largest node has "
            f"{d.max_gpus:g}; lower `num_gpus` in the suite",
            permanent=True,
        )
        d.writes.owe(entry, claim.attempt, outcome)
        d.writes.flush()
        return
    payload = dict(d.payload_base, job_id=claim.job_id, spec=claim.spec, model=claim.model)
    payload["others"] = others  # other models its kind loads (transfer sources, ...)
    if d.progress_prefix:
        payload["progress_key"] = progress_key(d.progress_prefix, claim.job_id)
    deadlines.stamp(payload, limit)
    handle = d.executor.submit(claim.job_id, payload, num_gpus, resources.get("memory_mb"))
    d.track(handle, entry, claim.attempt, limit)
