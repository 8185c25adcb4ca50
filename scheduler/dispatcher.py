"""The dispatcher: queued jobs in, Ray tasks out, results into SQL.

One loop per scheduler replica. It reads the stream with a consumer group, claims
each job row (compare-and-set, so two replicas never run one job), runs it on an
executor with the spec's resources, keeps at most ``max_in_flight`` tasks running, and
writes each result in one transaction *before* acknowledging the stream entry: a
replica that dies at any point leaves an unacknowledged entry that another replica
reclaims once it has been idle past the lease.

Failures: permanent ones (``JobFailure.permanent``) fail the job at once; transient
ones put it back to ``queued`` and leave the entry unacknowledged, so a reaper retries
it after the lease (the back-off). Only the job's own failures count against its
retries (``jobs.failures``, see ``attempts``); the failure that reaches the limit fails
it and moves its entry to the dead-letter stream. A scheduler that dies costs the job a
delivery, never a retry: deliveries only matter at a high safety net.

Nothing one entry does may stop the loop: an error while starting a job, storing its
result or registering what it produced fails that job with the error stored (or leaves
the entry to be retried, when the database or Redis itself is unreachable), and the
loop goes on. SQL is the source of truth; the reconciler (``reconcile``) gives every
waiting job that lost its stream entry a new one, at start and once per lease period.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis
import sqlalchemy as sa

from gauntlet.scheduler import attempts, lifecycle
from gauntlet.scheduler.executors import Executor, Handle
from gauntlet.scheduler.queue import Entry, JobQueue
from gauntlet.scheduler.reconcile import Reconciler, unfinished
from gauntlet.workers.jobs import job_kind
from gauntlet.workers.results import JobFailure, JobResult

log = logging.getLogger(__name__)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Running:
    handle: Handle
    entry: Entry
    attempt: int


@dataclass
class Stats:
    done: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0
    events: list = field(default_factory=list)


class Dispatcher:
    def __init__(
        self,
        engine,
        queue: JobQueue,
        executor: Executor,
        *,
        payload_base: dict,
        lease_seconds: float,
        max_in_flight: int = 4,
        consumer: str | None = None,
        progress_prefix: str | None = None,
        on_event: Callable[[str, int, str], None] | None = None,
        max_failures: int | None = None,
        delivery_limit: int = attempts.DELIVERY_SAFETY_NET,
        reconcile: bool = True,
    ):
        self.engine = engine
        self.queue = queue
        self.executor = executor
        self.payload_base = payload_base
        self.lease_seconds = lease_seconds
        self.max_in_flight = max_in_flight
        self.consumer = consumer or consumer_name()
        self.progress_prefix = progress_prefix
        self.on_event = on_event
        # A job's own transient failures it may have; the setting that used to bound
        # deliveries now bounds these.
        self.max_failures = max_failures or queue.max_deliveries
        self.delivery_limit = max(delivery_limit, self.max_failures)
        self.reconciler = (
            Reconciler(engine, queue, every_seconds=lease_seconds) if reconcile else None
        )
        self.running: dict[int, _Running] = {}
        self.stats = Stats()
        self._max_gpus = executor.max_gpus()

    # -- events -------------------------------------------------------------------------

    def _event(self, kind: str, job_id: int, message: str = "") -> None:
        log.info("job %s %s %s", job_id, kind, message)
        if self.on_event:
            self.on_event(kind, job_id, message)

    # -- taking work ----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return max(0, self.max_in_flight - len(self.running))

    def handle_entry(self, entry: Entry) -> None:
        """Decide what one delivered entry means: run it, drop it, or leave it pending."""
        try:
            self._handle_entry(entry)
        except Exception as exc:  # noqa: BLE001 - one entry must never stop the loop
            self._entry_error(entry, "could not start the job", exc)

    def _handle_entry(self, entry: Entry) -> None:
        job = lifecycle.get_job(self.engine, entry.job_id)
        if job is None:
            self._dead_letter(entry, f"no job {entry.job_id} in the database")
            return
        if job["status"] in (lifecycle.JobStatus.done, lifecycle.JobStatus.failed):
            if job["status"] == lifecycle.JobStatus.done and job["kind"] == "train":
                self._register_derived(job["id"])  # idempotent
            self.queue.ack(entry.entry_id)  # finished already: a duplicate or stale delivery
            self.stats.skipped += 1
            return
        if job["status"] == lifecycle.JobStatus.running and _lease_alive(job):
            return  # a live replica holds it; it acknowledges the entry when it finishes
        if entry.deliveries > self.delivery_limit:
            self._dead_letter(entry, f"delivered {entry.deliveries} times without finishing")
            return
        claim = lifecycle.claim(self.engine, entry.job_id, self.consumer, self.lease_seconds)
        if claim is None:
            return
        spec = claim.spec
        resources = spec.get("resources") or {}
        num_gpus = float(resources.get("num_gpus") or 0)
        if num_gpus > self._max_gpus:
            message = (
                f"the job asks for {num_gpus:g} GPUs but the largest node has "
                f"{self._max_gpus:g}; lower `num_gpus` in the suite"
            )
            lifecycle.fail(
                self.engine, claim.job_id, self.consumer, claim.attempt, message, permanent=True
            )
            self.queue.ack(entry.entry_id)
            self.stats.failed += 1
            self._event("failed", claim.job_id, message)
            return
        payload = dict(self.payload_base, job_id=claim.job_id, spec=spec, model=claim.model)
        # Other models the job loads (transfer sources, static models): its kind says which.
        payload["others"] = {
            model_id: lifecycle.get_model(self.engine, model_id)
            for model_id in job_kind(spec.get("kind", "eval")).models(spec)
        }
        if self.progress_prefix:
            payload["progress_key"] = f"{self.progress_prefix}:progress:{claim.job_id}"
        handle = self.executor.submit(claim.job_id, payload, num_gpus, resources.get("memory_mb"))
        self.running[claim.job_id] = _Running(handle, entry, claim.attempt)
        self._event("started", claim.job_id, f"attempt {claim.attempt}")

    def fill(self, block_ms: int = 0) -> int:
        """Read new entries up to capacity; returns how many were delivered."""
        if self.capacity == 0:
            return 0
        entries = self.queue.read(self.consumer, count=self.capacity, block_ms=block_ms)
        for entry in entries:
            self.handle_entry(entry)
        return len(entries)

    def reap(self) -> int:
        """Take over entries idle past the lease: a dead replica's, or a failed try's."""
        if self.capacity == 0:
            return 0  # reclaiming what we cannot run would only burn its deliveries
        min_idle = int(self.lease_seconds * 1000)
        entries = self.queue.reclaim(self.consumer, min_idle, count=self.capacity)
        for entry in entries:
            self.handle_entry(entry)
        self._max_gpus = self.executor.max_gpus()  # the cluster may have grown or shrunk
        return len(entries)

    # -- finishing work -------------------------------------------------------------------

    def collect(self, timeout: float) -> int:
        handles = [r.handle for r in self.running.values()]
        ready = self.executor.ready(handles, timeout)
        for handle in ready:
            running = self.running.pop(handle.job_id)
            try:
                self._finish(running, self.executor.outcome(handle))
            except Exception as exc:  # noqa: BLE001 - one result must never stop the loop
                self._entry_error(running.entry, "could not store the result", exc)
        return len(ready)

    def _finish(self, running: _Running, outcome: JobResult | JobFailure) -> None:
        job_id, entry, attempt = running.handle.job_id, running.entry, running.attempt
        if isinstance(outcome, JobResult):
            if lifecycle.finish(self.engine, job_id, self.consumer, attempt, outcome):
                if outcome.details.get("derived_weights_sha256"):
                    # Before the ack: a crash here leaves the entry to be redelivered,
                    # and registering the same derived model again changes nothing.
                    if not self._register_derived(job_id):
                        self.queue.ack(entry.entry_id)
                        return
                self.queue.ack(entry.entry_id)
                self.stats.done += 1
                self._event("done", job_id)
            else:
                # Our lease lapsed and another replica took the job: its result counts.
                self._event("fenced", job_id, "lease lost; result discarded")
            return
        if outcome.permanent:
            if lifecycle.fail(
                self.engine, job_id, self.consumer, attempt, outcome.message, permanent=True
            ):
                self.queue.ack(entry.entry_id)
                self.stats.failed += 1
                self._event("failed", job_id, outcome.message)
            return
        counted = attempts.record_failure(
            self.engine,
            job_id,
            self.consumer,
            attempt,
            outcome.message,
            max_failures=self.max_failures,
        )
        if counted is None:
            return  # fenced out: whoever holds the job now decides
        gave_up, failures = counted
        if gave_up:
            self.queue.dead_letter(entry, outcome.message)
            self.stats.dead += 1
            self._event("dead", job_id, f"gave up after {failures} failures: {outcome.message}")
            return
        # Left unacknowledged on purpose: the reaper retries it after the lease.
        self.stats.retried += 1
        self._event("retry", job_id, outcome.message)

    def _dead_letter(self, entry: Entry, reason: str) -> None:
        lifecycle.fail_dead_lettered(self.engine, entry.job_id, reason)
        self.queue.dead_letter(entry, reason)
        self.stats.dead += 1
        self._event("dead", entry.job_id, reason)

    def _register_derived(self, job_id: int) -> bool:
        """Register a train job's model; on an error the job fails with it stored."""
        from gauntlet.scheduler.train import register_derived

        try:
            register_derived(self.engine, self.queue, job_id)
            return True
        except Exception as exc:
            if _unreachable(exc):
                raise  # the entry stays pending and the next delivery registers it
            message = f"trained, but registering the derived model failed: {_describe(exc)}"
            attempts.fail_job(self.engine, job_id, message, keep_done=False)
            self.stats.failed += 1
            self._event("failed", job_id, message)
            return False

    def _entry_error(self, entry: Entry, what: str, exc: Exception) -> None:
        """An error outside the job's own code: fail the job, or leave it for a retry.

        When the database or Redis cannot be reached nothing can be recorded; the entry
        stays pending and is delivered again after the lease. Anything else would fail
        the same way on every delivery, so the job fails now with the error stored.
        """
        if _unreachable(exc):
            log.warning("job %s: %s (%s); retried after the lease", entry.job_id, what, exc)
            return
        message = f"{what}: {_describe(exc)}"
        log.exception("job %s: %s", entry.job_id, what)
        try:
            attempts.fail_job(self.engine, entry.job_id, message)
            self.queue.ack(entry.entry_id)
        except Exception:  # noqa: BLE001 - recording the failure failed too: retry later
            log.exception("job %s: could not record the failure", entry.job_id)
            return
        self.stats.failed += 1
        self._event("failed", entry.job_id, message)

    def reconcile(self, *, force: bool = False) -> int:
        """Run the reconciler if due (or ``force``); how many jobs it repaired."""
        if self.reconciler is None or not (force or self.reconciler.due()):
            return 0
        try:
            report = self.reconciler.run()
        except Exception:  # noqa: BLE001 - a failed repair is retried next period
            log.exception("reconciling SQL with the stream failed")
            return 0
        if report is None:
            return 0
        for job_id in report.enqueued + report.adopted:
            self._event("repaired", job_id)
        return report.repaired

    def heartbeat(self) -> None:
        """Extend the SQL leases and the stream entries' idle clocks of running jobs."""
        for job_id, running in list(self.running.items()):
            lifecycle.renew(self.engine, job_id, self.consumer, running.attempt, self.lease_seconds)
        if self.running:
            self.queue.heartbeat(self.consumer, [r.entry.entry_id for r in self.running.values()])

    # -- the loop -------------------------------------------------------------------------

    def run(
        self,
        *,
        drain: bool = False,
        should_stop: Callable[[], bool] | None = None,
        poll_seconds: float = 0.2,
    ) -> Stats:
        """Work until stopped; with ``drain``, until the queue is empty and nothing runs."""
        reap_every = max(0.05, self.lease_seconds / 4)
        beat_every = max(0.05, self.lease_seconds / 3)
        # Waiting on tasks must leave room for heartbeats well inside the lease.
        poll_seconds = min(poll_seconds, beat_every / 2)
        last_reap = last_beat = 0.0
        self.reconcile(force=True)  # entries lost while no scheduler ran
        while True:
            now = time.monotonic()
            if now - last_reap >= reap_every:
                self.reap()
                last_reap = now
            self.reconcile()
            # Block on the stream only when nothing runs: otherwise poll the tasks.
            self.fill(block_ms=0 if self.running else int(poll_seconds * 1000))
            if self.running:
                self.collect(timeout=poll_seconds)
            if time.monotonic() - last_beat >= beat_every:
                self.heartbeat()
                last_beat = time.monotonic()
            if should_stop and should_stop():
                break
            # An empty stream is not enough: SQL may still hold work whose entry was
            # lost, which the reconciler gives a new entry within a lease period.
            if drain and not self.running and self.queue.is_empty():
                if self.reconciler is None or not unfinished(self.engine):
                    break
        return self.stats


def _unreachable(exc: BaseException) -> bool:
    """The database or Redis is down or cut off: nothing about the job itself."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _lease_alive(job: dict) -> bool:
    expires = job.get("lease_expires_at")
    return expires is not None and expires > datetime.now(timezone.utc)
