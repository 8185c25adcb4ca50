"""The submission gate in the scheduler: queue it first, release the suite on its verdict.

With ``GAUNTLET_GATE`` on, ``submit`` inserts one ``gate`` job (``workers.jobs.gate``)
instead of the suite's jobs. The suite travels in the gate's spec, resolved at submit
time like a train job's, and the dispatcher calls ``release`` once the gate's result is
stored: a passed gate inserts and enqueues the suite (transfer pairs with models that
did not fail their own gate included); a failed one fails the gate job with its reasons
and stores the model's other jobs as failed with the same reasons, so ``gauntlet jobs``
shows why nothing ran. No new job status is needed: the jobs simply do not exist
until the gate lets them. ``release`` is idempotent, so a redelivered gate result, or
the same submission again, changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict

import sqlalchemy as sa

from gauntlet.db.schema import Job, JobStatus, utcnow
from gauntlet.scheduler import attempts, lifecycle
from gauntlet.scheduler.lifecycle import NewJob, _insert
from gauntlet.scheduler.queue import JobQueue
from gauntlet.scheduler.spec import JobSpec
from gauntlet.scheduler.submit import enqueue_new, expand_suite, new_jobs
from gauntlet.scheduler.suites import load_suite
from gauntlet.workers.datasets import dataset_info
from gauntlet.workers.jobs.gate import PROBE_POINTS, PROCEDURE

KIND = "gate"
FOLLOWUP = "followup"  # the suite column of follow-up jobs (scheduler.followups)
# The error of a job the gate stopped; a later passing gate requeues exactly these.
BLOCKED = "stopped by the submission gate"


def gate_spec(model_id: str, dataset: str, suite: str, n: int | None, card: dict | None):
    """The gate job of one submission: its probe, the suite it releases, the claims."""
    card = card or {}
    params = {
        "suite": {"name": suite, "definition": asdict(load_suite(suite))},
        "suite_n": n,
        "claimed_clean": card.get("clean_acc"),
        "randomized": bool(card.get("randomized", False)),
    }
    probe = min(PROBE_POINTS, dataset_info(dataset).test_size)
    spec = JobSpec(
        model_id=model_id, dataset=dataset, attack=PROCEDURE, params=params, kind=KIND, n=probe
    )
    spec.validate()
    return spec


def queue_gate(engine, queue: JobQueue, spec: JobSpec) -> list[int]:
    """Insert the gate job (once); a gate already passed releases its suite again.

    Releasing again adds what is new since (transfer pairs with newer models).
    """
    inserted = lifecycle.insert_jobs(engine, new_jobs([spec], None))
    if not inserted:
        with engine.connect() as conn:
            job_id = conn.scalar(sa.select(Job.id).where(Job.job_key == spec.key))
        if job_id is not None:
            release(engine, queue, job_id)
    return inserted


def insert_with(engine, jobs: list[NewJob], **columns) -> list[int]:
    """Insert jobs whose key has no row yet, with extra columns (status, error, details)."""
    unique = list({job.job_key: job for job in jobs}.values())
    if not unique:
        return []
    now = utcnow()
    rows = [dict(vars(job), attempts=0, created_at=now, **columns) for job in unique]
    rows = [dict(row, status=row.get("status", JobStatus.queued)) for row in rows]
    stmt = _insert(engine, Job.__table__).on_conflict_do_nothing(index_elements=["job_key"])
    with engine.begin() as conn:
        result = conn.execute(stmt.returning(Job.id), rows)
        return [row[0] for row in result]


def held_models(engine) -> set[str]:
    """Models the gate holds back: a gate queued, running or failed, and none passed.

    No transfer pair or surrogate is made with them, and nightly skips them; a held model
    whose gate passes later makes its pairs itself, both ways, when it is released.
    """
    stmt = sa.select(Job.model_id, Job.status).where(Job.kind == KIND)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    passed = {m for m, status in rows if status == JobStatus.done}
    return {m for m, _ in rows} - passed


def admitted(engine, models: list[dict]) -> list[dict]:
    """``models`` without those the gate holds back (nightly's filter)."""
    held = held_models(engine)
    return [m for m in models if m["id"] not in held]


def _partners(spec: JobSpec) -> set[str]:
    return {spec.model_id, *([spec.source_model] if spec.source_model else [])} | set(
        spec.source_ensemble
    )


def release(engine, queue: JobQueue, job_id: int) -> bool | None:
    """Act on a stored gate verdict: True (suite queued), False (stopped), None (no verdict)."""
    from gauntlet.scheduler.train import job_suite

    job = lifecycle.get_job(engine, job_id)
    if job is None or job["kind"] != KIND or job["status"] != JobStatus.done:
        return None
    verdict = (job.get("details") or {}).get("gate")
    if verdict is None:
        return None
    params = job["spec"].get("params") or {}
    # The gate row has no suite of its own, or nightly would expand it at the probe's n.
    suite, n, name = job_suite(job), params.get("suite_n"), params["suite"]["name"]
    model_id, dataset = job["model_id"], job["dataset"]
    if verdict.get("passed"):
        blocked = held_models(engine) - {model_id}
        specs = expand_suite(suite, model_id, dataset, n, engine=engine)
        specs = [s for s in specs if not _partners(s) & blocked]
        lifecycle.insert_jobs(engine, new_jobs(specs, name))
        _unblock(engine, [s.key for s in specs])
        enqueue_new(engine, queue)
        return True
    reason = "; ".join(verdict.get("failures") or ["no reason given"])
    # The model's own jobs only: transfer pairs with other models are simply not made.
    specs = expand_suite(suite, model_id, dataset, n)
    message = f"{BLOCKED} (job {job_id}): {reason}"
    insert_with(
        engine,
        new_jobs(specs, name),
        status=JobStatus.failed,
        error=message,
        finished_at=utcnow(),
    )
    # Last: until the gate job is failed, a redelivery of its entry releases it again.
    attempts.fail_job(engine, job_id, f"submission gate failed: {reason}", keep_done=False)
    return False


def _unblock(engine, keys: list[str]) -> None:
    """Jobs a failed gate stopped, now released by a passed one (a corrected card)."""
    if not keys:
        return
    stmt = sa.select(Job.id).where(
        Job.job_key.in_(keys), Job.status == JobStatus.failed, Job.error.startswith(BLOCKED)
    )
    with engine.connect() as conn:
        ids = list(conn.scalars(stmt))
    for blocked_id in ids:
        lifecycle.requeue(engine, blocked_id)
