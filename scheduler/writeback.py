"""What a scheduler owes SQL and the stream for tasks that finished: kept across outages.

A finished task's outcome goes into SQL in one fenced transaction (``lifecycle.finish``
or a failure), and only then is its stream entry acknowledged. Either write may meet an
outage: the outcome then waits here, in memory, until the database answers again, and
the acknowledgement until Redis does. The write stays fenced by owner and attempt, so a
result whose lease another replica took over in the meantime is dropped, never written
twice. A scheduler that dies with outcomes still owed loses only that work: its jobs'
leases lapse and another replica runs them again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gauntlet.scheduler import attempts, bulk, lifecycle, outage
from gauntlet.scheduler.outage import DATABASE, REDIS
from gauntlet.scheduler.queue import Entry
from gauntlet.workers.results import JobFailure, JobResult

if TYPE_CHECKING:  # the dispatcher imports this module
    from gauntlet.scheduler.dispatcher import Dispatcher

log = logging.getLogger(__name__)


@dataclass
class Stats:
    done: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0
    timed_out: int = 0  # tasks cancelled at their time limit
    cancelled: int = 0  # tasks stopped because their job was no longer ours
    outages: int = 0  # Redis or database outages ridden through
    events: list = field(default_factory=list)


@dataclass
class Owed:
    """A finished task's outcome that SQL has not taken yet."""

    entry: Entry
    attempt: int
    outcome: JobResult | JobFailure
    stored: bool = False  # the result is in; only registering a derived model is left


def may_follow(outcome: JobResult) -> bool:
    """Whether a stored result could call for follow-ups: flags fired, or a black-box
    attack (which may beat every white-box one); clean accuracy and the like never."""
    details = outcome.details or {}
    return bool(details.get("flags")) or any(m.name == "mean_queries" for m in outcome.metrics)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class WriteBack:
    """The owed writes of one dispatcher, ``owner``: its engine, queue, consumer name,
    service links, stats, event hook and failure limit are the dispatcher's own."""

    def __init__(self, owner: Dispatcher):
        self.d = owner
        self.owed: list[Owed] = []
        self.unacked: list[tuple[Entry, str | None]] = []  # (entry, dead-letter reason)

    @property
    def pending(self) -> bool:
        return bool(self.owed or self.unacked)

    def held_entries(self) -> list[str]:
        """Entries of outcomes not yet in SQL: still ours, or a reaper would rerun them."""
        return [owed.entry.entry_id for owed in self.owed]

    def owe(self, entry: Entry, attempt: int, outcome: JobResult | JobFailure) -> None:
        self.owed.append(Owed(entry, attempt, outcome))

    def flush(self) -> None:
        """Write what is owed, oldest first, to whichever service is reachable."""
        waiting = []
        rest = self._store_batch(self.owed) if self.d.links.up(DATABASE) else self.owed
        for owed in rest:
            if not self.d.links.up(DATABASE) or not self._store_safely(owed):
                waiting.append(owed)
        self.owed = waiting
        self._flush_acks()

    def _plain(self, owed: Owed) -> bool:
        """A result that needs nothing after it is stored but its acknowledgement."""
        outcome = owed.outcome
        if not isinstance(outcome, JobResult) or owed.stored:
            return False
        details = outcome.details or {}
        if details.get("derived_weights_sha256") or "gate" in details:
            return False
        return not (self.d.followups and may_follow(outcome))

    def _store_batch(self, owed: list[Owed]) -> list[Owed]:
        """Store the plain results in one transaction; what is left for one by one.

        Any error other than an outage hands the whole batch back to the one-by-one
        path, where the result that caused it fails alone.
        """
        batch = [o for o in owed if self._plain(o)]
        if not batch:
            return owed
        triples = [(o.entry.job_id, o.attempt, o.outcome) for o in batch]
        try:
            stored = bulk.finish_many(self.d.engine, self.d.consumer, triples)
        except Exception as exc:  # noqa: BLE001 - retried one by one, or after the outage
            self.d.note_outage(exc)
            return owed
        for o in batch:
            job_id = o.entry.job_id
            if job_id not in stored:
                # Our lease lapsed and another replica took the job: its result counts.
                self.d.event("fenced", job_id, "lease lost; result discarded")
                continue
            self.unacked.append((o.entry, None))
            self.d.stats.done += 1
            self.d.event("done", job_id, "")
        chosen = {id(o) for o in batch}
        return [o for o in owed if id(o) not in chosen]

    def _store_safely(self, owed: Owed) -> bool:
        """``_store``; False when an outage means trying again later."""
        try:
            return self._store(owed)
        except Exception as exc:  # noqa: BLE001 - one result must never stop the loop
            if self.d.note_outage(exc):
                return False
            self.entry_error(owed.entry, "could not store the result", exc)
            return True

    def _store(self, owed: Owed) -> bool:
        """Record one outcome, fenced by our lease; False to wait for Redis."""
        entry, attempt, outcome = owed.entry, owed.attempt, owed.outcome
        job_id = entry.job_id
        if isinstance(outcome, JobResult):
            if not owed.stored:
                if not lifecycle.finish(self.d.engine, job_id, self.d.consumer, attempt, outcome):
                    # Our lease lapsed and another replica took the job: its result counts.
                    self.d.event("fenced", job_id, "lease lost; result discarded")
                    return True
                owed.stored = True
            if outcome.details.get("derived_weights_sha256"):
                if not self.d.links.up(REDIS):
                    return False  # registering enqueues the derived model's suite
                # Before the ack: a crash here leaves the entry to be redelivered, and
                # registering the same derived model again changes nothing.
                if not self.register_derived(job_id):
                    self.settle(entry)
                    return True
            if "gate" in outcome.details or (self.d.followups and may_follow(outcome)):
                if not self.d.links.up(REDIS):
                    return False  # both enqueue what they add
                if not self.follow_on(job_id):
                    self.settle(entry)
                    return True
            self.settle(entry)
            self.d.stats.done += 1
            self.d.event("done", job_id, "")
            return True
        if outcome.permanent:
            if lifecycle.fail(
                self.d.engine, job_id, self.d.consumer, attempt, outcome.message, permanent=True
            ):
                self.settle(entry)
                self.d.stats.failed += 1
                self.d.event("failed", job_id, outcome.message)
            return True
        counted = attempts.record_failure(
            self.d.engine,
            job_id,
            self.d.consumer,
            attempt,
            outcome.message,
            max_failures=self.d.max_failures,
        )
        if counted is None:
            return True  # fenced out: whoever holds the job now decides
        gave_up, failures = counted
        if gave_up:
            self.settle(entry, outcome.message)
            self.d.stats.dead += 1
            self.d.event("dead", job_id, f"gave up after {failures} failures: {outcome.message}")
            return True
        # Left unacknowledged on purpose: the reaper retries it after the lease.
        self.d.stats.retried += 1
        self.d.event("retry", job_id, outcome.message)
        return True

    def settle(self, entry: Entry, dead_reason: str | None = None) -> None:
        """Acknowledge an entry (or dead-letter it), now or once Redis is back."""
        self.unacked.append((entry, dead_reason))
        self._flush_acks()

    def _flush_acks(self) -> None:
        while self.unacked and self.d.links.up(REDIS):
            entry, reason = self.unacked[0]
            # A run of plain acknowledgements goes in one round trip.
            run = 1
            while run < len(self.unacked) and reason is None and self.unacked[run][1] is None:
                run += 1
            try:
                if reason is None:
                    self.d.queue.ack_many([e.entry_id for e, _ in self.unacked[:run]])
                else:
                    self.d.queue.dead_letter(entry, reason)
            except Exception as exc:  # noqa: BLE001 - an ack must never stop the loop
                if self.d.note_outage(exc):
                    return
                # The job is settled in SQL: a redelivery of the entry is acked as stale.
                log.exception("job %s: acknowledging entry %s failed", entry.job_id, entry)
            del self.unacked[:run]

    def register_derived(self, job_id: int) -> bool:
        """Register a train job's model; on an error the job fails with it stored."""
        from gauntlet.scheduler.train import register_derived

        try:
            register_derived(self.d.engine, self.d.queue, job_id)
            return True
        except Exception as exc:
            if outage.service_of(exc):
                raise  # registered once the service is back (or at the next delivery)
            message = f"trained, but registering the derived model failed: {describe(exc)}"
            attempts.fail_job(self.d.engine, job_id, message, keep_done=False)
            self.d.stats.failed += 1
            self.d.event("failed", job_id, message)
            return False

    def follow_on(self, job_id: int) -> bool:
        """Release a gate's suite, or queue a flagged result's follow-ups (idempotent).

        False when a gate stopped its model, or could not be released: the gate job is
        failed with the reason. A follow-up that cannot be planned is logged; the result
        it follows stays stored.
        """
        from gauntlet.scheduler import followups

        try:
            stopped = followups.after_result(self.d.engine, self.d.queue, job_id, self.d.followups)
        except Exception as exc:
            if outage.service_of(exc):
                raise
            if lifecycle.get_job(self.d.engine, job_id)["kind"] != "gate":
                log.exception("job %s: queueing its follow-ups failed", job_id)
                return True
            message = f"releasing the model's jobs failed: {describe(exc)}"
            attempts.fail_job(self.d.engine, job_id, message, keep_done=False)
            self.d.stats.failed += 1
            self.d.event("failed", job_id, message)
            return False
        if stopped:
            self.d.stats.failed += 1
            self.d.event("failed", job_id, stopped)
        return not stopped

    def dead_letter(self, entry: Entry, reason: str) -> None:
        lifecycle.fail_dead_lettered(self.d.engine, entry.job_id, reason)
        self.settle(entry, reason)
        self.d.stats.dead += 1
        self.d.event("dead", entry.job_id, reason)

    def entry_error(self, entry: Entry, what: str, exc: Exception) -> None:
        """An error outside the job's own code: the job fails with the error stored.

        Anything but an outage would fail the same way on every delivery. If recording
        the failure meets an outage, the entry stays pending and comes back later.
        """
        message = f"{what}: {describe(exc)}"
        log.exception("job %s: %s", entry.job_id, what)
        try:
            attempts.fail_job(self.d.engine, entry.job_id, message)
        except Exception as error:  # noqa: BLE001 - recording the failure failed too
            if not self.d.note_outage(error):
                log.exception("job %s: could not record the failure", entry.job_id)
            return
        self.settle(entry)
        self.d.stats.failed += 1
        self.d.event("failed", entry.job_id, message)
