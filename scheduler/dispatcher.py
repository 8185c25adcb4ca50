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

Outages (``outage``): a call that finds Redis or the database unreachable marks that
service down, and the loop carries on with what does not need it: tasks keep running,
finished outcomes and acknowledgements wait in memory (``writeback``), leases are
renewed through whichever service is up. A probe with a capped back-off ends the
outage; after Redis comes back (perhaps empty) the scheduler repairs the stream at once.
Time limits (``deadlines``) and a cancel by an operator (the row is no longer ours at
the next renewal) both stop the task.

Batches: the SQL and Redis work of a job costs about as much per statement as per
batch, so the loop gathers work before it pays. Once a task finishes it lingers (at
most ``linger_s``) for more to finish, so their results share one transaction and one
acknowledgement; and it refills free slots a batch at a time (a quarter of
``max_in_flight``), unless a slot has been free for ``linger_s``, so a cluster of long
jobs never waits more than that for its next one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from gauntlet.scheduler import attempts, deadlines, lifecycle, outage, taking
from gauntlet.scheduler.executors import Executor, Handle
from gauntlet.scheduler.outage import DATABASE, REDIS
from gauntlet.scheduler.queue import Entry, JobQueue
from gauntlet.scheduler.reconcile import Reconciler, repair, unfinished
from gauntlet.scheduler.writeback import Stats, WriteBack
from gauntlet.workers.results import JobFailure

__all__ = ["Dispatcher", "Stats", "consumer_name"]

log = logging.getLogger(__name__)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Running:
    handle: Handle
    entry: Entry
    attempt: int
    started: float = field(default_factory=time.monotonic)
    limit_s: float = float("inf")


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
        max_job_seconds: float | None = None,
        reconnect_seconds: tuple[float, float] = (0.1, 5.0),
        followups: bool = False,  # queue follow-ups of flagged results (scheduler.followups)
        linger_s: float = 0.02,
    ):
        self.followups = followups
        self.engine = engine
        self.queue = queue
        self.executor = executor
        self.payload_base = payload_base
        self.lease_seconds = lease_seconds
        self.max_in_flight = max_in_flight
        self.batch = max(1, max_in_flight // 4)
        self.linger_s = linger_s
        # When free slots, fewer than a batch, are read: a linger after the first went
        # free, or a poll period after a read that found the stream empty.
        self._read_due: float | None = None
        self._poll_seconds = 0.2  # the loop's, set by ``run``
        self.consumer = consumer or consumer_name()
        self.progress_prefix = progress_prefix
        self.on_event = on_event
        # A job's own transient failures it may have; the setting that used to bound
        # deliveries now bounds these.
        self.max_failures = max_failures or queue.max_deliveries
        self.delivery_limit = max(delivery_limit, self.max_failures)
        self.max_job_seconds = max_job_seconds
        self.reconciler = (
            Reconciler(engine, queue, every_seconds=lease_seconds) if reconcile else None
        )
        outage.fail_fast(queue.client)
        self.links = outage.Links(
            {REDIS: queue.client.ping, DATABASE: self._ping_database},
            first_delay=reconnect_seconds[0],
            max_delay=reconnect_seconds[1],
            on_recovered=self._recovered,
        )
        self.running: dict[int, _Running] = {}
        self.stats = Stats()
        self.writes = WriteBack(self)
        self._deferred: dict[str, Entry] = {}  # delivered, then a service went away
        self._repair_due = False
        self._max_gpus = executor.max_gpus()

    # -- events and outages -------------------------------------------------------------

    def event(self, kind: str, job_id: int, message: str = "") -> None:
        log.info("job %s %s %s", job_id, kind, message)
        if self.on_event:
            self.on_event(kind, job_id, message)

    def note_outage(self, exc: BaseException) -> bool:
        """Note an outage if ``exc`` is one; False for any other error."""
        found = self.links.guard(exc)
        self.stats.outages = self.links.outages
        return found

    def _try(self, call: Callable, *args):
        """``call(*args)``, or None after noting an outage; other errors propagate."""
        try:
            return call(*args)
        except Exception as exc:
            if self.note_outage(exc):
                return None
            raise

    def _ping_database(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def _recovered(self, service: str, _lasted: float) -> None:
        # A Redis that restarted empty lost every entry: repair at once, not a period on.
        if service == REDIS:
            self._repair_due = True

    # -- taking work ----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return max(0, self.max_in_flight - len(self.running))

    def handle_entry(self, entry: Entry) -> None:
        """Decide what one delivered entry means: run it, drop it, or leave it pending."""
        taking.handle_entry(self, entry)

    def defer(self, entries: list[Entry]) -> None:
        """Entries delivered while a service went away: handled again once it is back."""
        for entry in entries:
            self._deferred[entry.entry_id] = entry

    @property
    def max_gpus(self) -> float:
        return self._max_gpus

    def track(self, handle: Handle, entry: Entry, attempt: int, limit: float) -> None:
        """A task just started for ``entry``'s job."""
        self.running[handle.job_id] = _Running(handle, entry, attempt, limit_s=limit)
        self.event("started", handle.job_id, f"attempt {attempt}")

    def _worth_reading(self) -> bool:
        """Whether free slots should be filled now: a batch of them, or none running,
        or a slot that has waited its linger for others to free up."""
        if self.capacity == 0:
            self._read_due = None
            return False
        if self.capacity >= self.batch or not self.running:
            return True
        now = time.monotonic()
        if self._read_due is None:
            self._read_due = now + self.linger_s
        return now >= self._read_due

    def _collect_timeout(self, poll_seconds: float) -> float:
        """How long to wait on tasks: no later than the free slots' read is due."""
        if self._read_due is None:
            return poll_seconds
        return min(poll_seconds, max(0.0, self._read_due - time.monotonic()))

    def fill(self, block_ms: int = 0) -> int:
        """Read new entries up to capacity; returns how many were delivered."""
        for entry_id in list(self._deferred):
            if self.capacity == 0 or not self.links.up(REDIS, DATABASE):
                return 0
            self.handle_entry(self._deferred.pop(entry_id))
        if not self._worth_reading() or not self.links.up(REDIS, DATABASE):
            return 0
        asked = self.capacity
        entries = self._try(self.queue.read, self.consumer, asked, block_ms) or []
        # A short read found the stream empty: ask again a poll period on, not a linger.
        short = len(entries) < asked
        self._read_due = time.monotonic() + self._poll_seconds if short else None
        taking.handle_entries(self, entries)
        return len(entries)

    def reap(self) -> int:
        """Take over entries idle past the lease: a dead replica's, or a failed try's."""
        if self.capacity == 0 or not self.links.up(REDIS, DATABASE):
            return 0  # reclaiming what we cannot run would only burn its deliveries
        min_idle = int(self.lease_seconds * 1000)
        entries = self._try(self.queue.reclaim, self.consumer, min_idle, self.capacity) or []
        taking.handle_entries(self, entries)
        self._max_gpus = self.executor.max_gpus()  # the cluster may have grown or shrunk
        return len(entries)

    # -- finishing work -------------------------------------------------------------------

    def collect(self, timeout: float) -> int:
        handles = [r.handle for r in self.running.values()]
        ready = self.executor.ready(handles, timeout)
        want = min(self.batch, len(handles))
        if ready and len(ready) < want:
            # Small jobs finish in bursts: a moment's wait lets their writes share a batch.
            ready = self.executor.ready(handles, self.linger_s, count=want)
        for handle in ready:
            running = self.running.pop(handle.job_id)
            self.writes.owe(running.entry, running.attempt, self.executor.outcome(handle))
        self.writes.flush()
        return len(ready)

    def check_deadlines(self) -> int:
        """Cancel tasks past their time limit; their jobs fail, for good."""
        now = time.monotonic()
        late = [r for r in self.running.values() if deadlines.overdue(r.started, r.limit_s, now)]
        for running in late:
            self._stop(running)
            self.stats.timed_out += 1
            message = deadlines.message(running.started, running.limit_s, now)
            self.writes.owe(running.entry, running.attempt, JobFailure(message, permanent=True))
        self.writes.flush()
        return len(late)

    def _stop(self, running: _Running) -> None:
        """Cancel a task and forget it: whatever it returns now is never read."""
        self.running.pop(running.handle.job_id, None)
        try:
            self.executor.cancel(running.handle)
        except Exception:  # noqa: BLE001 - a task that cannot be cancelled is finished
            log.warning("job %s: cancelling its task failed", running.handle.job_id, exc_info=True)

    def reconcile(self, *, force: bool = False) -> int:
        """Run the reconciler if due (or ``force``); how many jobs it repaired."""
        if self.reconciler is None or not self.links.up(REDIS, DATABASE):
            return 0
        after_outage = self._repair_due
        if not (force or after_outage or self.reconciler.due()):
            return 0
        try:
            if after_outage:
                # Not through the replicas' shared lock: it may have survived the outage
                # and speak of a repair from before it.
                grace = self.reconciler.grace_seconds
                report = repair(self.engine, self.queue, grace_seconds=grace)
            else:
                report = self.reconciler.run()
        except Exception as exc:  # noqa: BLE001 - a failed repair is retried next period
            if not self.note_outage(exc):
                log.exception("reconciling SQL with the stream failed")
            return 0
        self._repair_due = False
        if report is None:
            return 0
        for job_id in report.enqueued + report.adopted:
            self.event("repaired", job_id)
        return report.repaired

    def heartbeat(self) -> None:
        """Extend the SQL leases and the stream entries' idle clocks of running jobs.

        A job whose row is no longer ours (an operator cancelled it, or our lease lapsed
        and another replica took it) has its task stopped, and nothing is written.
        """
        if self.links.up(DATABASE):
            for job_id, running in list(self.running.items()):
                try:
                    ours = lifecycle.renew(
                        self.engine, job_id, self.consumer, running.attempt, self.lease_seconds
                    )
                except Exception as exc:  # noqa: BLE001 - renewed at the next beat
                    if self.note_outage(exc):
                        break
                    log.exception("job %s: renewing its lease failed", job_id)
                    continue
                if not ours:
                    self._stop(running)
                    self.stats.cancelled += 1
                    self.event("cancelled", job_id, "the job is no longer ours; task stopped")
        # Outcomes waiting for SQL keep their entries too, or a reaper would rerun them.
        held = [r.entry.entry_id for r in self.running.values()]
        held += self.writes.held_entries()
        if held and self.links.up(REDIS):
            try:
                self.queue.heartbeat(self.consumer, held)
            except Exception as exc:  # noqa: BLE001 - beaten again at the next beat
                if not self.note_outage(exc):
                    log.exception("renewing the stream entries failed")

    # -- the loop -------------------------------------------------------------------------

    def drained(self) -> bool:
        """Nothing left anywhere: no task, nothing owed, no outage hiding work, and the
        stream and SQL agree there is nothing to do."""
        if self.running or self.writes.pending or self._deferred or self.links.down():
            return False
        if not self._try(self.queue.is_empty):
            return False
        # An empty stream is not enough: SQL may still hold work whose entry was lost,
        # which the reconciler gives a new entry within a lease period.
        return self.reconciler is None or self._try(unfinished, self.engine) == 0

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
        self._poll_seconds = poll_seconds
        last_reap = last_beat = 0.0
        self.reconcile(force=True)  # entries lost while no scheduler ran
        while True:
            self.links.probe()
            self.writes.flush()  # before a repair could take our finished jobs for lost
            now = time.monotonic()
            if now - last_reap >= reap_every:
                self.reap()
                last_reap = now
            self.reconcile()
            # Block on the stream only when nothing runs: otherwise poll the tasks.
            idle = not self.running and not self.links.down()
            self.fill(block_ms=int(poll_seconds * 1000) if idle else 0)
            if self.running:
                self.collect(timeout=self._collect_timeout(poll_seconds))
                self.check_deadlines()
            elif self.links.down():
                time.sleep(min(poll_seconds, max(0.01, self.links.next_probe_in())))
            if time.monotonic() - last_beat >= beat_every:
                self.heartbeat()
                last_beat = time.monotonic()
            if should_stop and should_stop():
                break
            if drain and self.drained():
                break
        if self.writes.owed:
            log.warning(
                "stopping with %d results not written; their jobs run again after the lease",
                len(self.writes.owed),
            )
        return self.stats
