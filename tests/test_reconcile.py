"""SQL is the source of truth: a lost stream is repaired, and no job is XADDed twice."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from gauntlet.db.schema import Job
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.enqueue import enqueue_once, new_marker
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.nightly import nightly
from gauntlet.scheduler.reconcile import find_stranded, repair
from gauntlet.scheduler.submit import enqueue_new, expand_suite, new_jobs
from tests import queue_helpers
from tests.queue_helpers import entries_per_job, fgsm_suite, statuses
from tests.service_helpers import add_model, make_app, submit_digits

own_redis = queue_helpers.own_redis
fault_stack = queue_helpers.fault_stack


def _app(tmp_path, stack, **overrides):
    return make_app(tmp_path / "home", **{**stack, "GAUNTLET_LEASE_SECONDS": 1, **overrides})


def test_flushall_mid_run_is_repaired_and_drained(tmp_path, digits_models, fault_stack):
    app = _app(tmp_path, fault_stack)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, 20))
    first = app.dispatcher(LocalExecutor(), max_in_flight=1)
    first.run(should_stop=lambda: first.stats.done >= 4)
    app.redis.flushall()  # the stream, its group and every pending entry are gone
    time.sleep(1.2)  # past the lease of the job the stopped scheduler may still hold

    left = {j["id"] for j in lifecycle.list_jobs(app.engine, limit=None) if j["status"] != "done"}
    assert len(left) == 16
    assert {s.job_id for s in find_stranded(app.engine, app.queue, grace_seconds=1)} == left
    report = repair(app.engine, app.queue, grace_seconds=1)
    assert sorted(report.enqueued) == sorted(left) and not report.raced
    assert entries_per_job(app.queue) == {job_id: 1 for job_id in left}
    # A second repair finds nothing: every job has its live entry now.
    assert repair(app.engine, app.queue, grace_seconds=1).repaired == 0

    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert statuses(app.engine) == {"done": 20}
    assert stats.done == 16 and stats.failed == stats.dead == 0
    assert app.queue.is_empty()


def test_scheduler_repairs_a_flushed_stream_on_its_own(tmp_path, digits_models, fault_stack):
    app = _app(tmp_path, fault_stack)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, 16))
    app.redis.flushall()
    assert app.queue.is_empty()  # the stream says nothing is left; SQL says 16 are
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert statuses(app.engine) == {"done": 16}
    assert stats.done == 16


def test_concurrent_submits_xadd_each_job_once(tmp_path, digits_models, fault_stack):
    """Four submits of one model, an enqueuer sweep and a repair, all at once."""
    suite = fgsm_suite(tmp_path, 20)
    apps = [_app(tmp_path, fault_stack) for _ in range(6)]
    start = threading.Barrier(len(apps))
    errors = []

    def work(index: int) -> None:
        app = apps[index]
        try:
            start.wait()
            if index < 4:
                submit_digits(app, digits_models["standard"], suite=suite)
            elif index == 4:
                for _ in range(20):
                    enqueue_new(app.engine, app.queue)
            else:
                for _ in range(20):
                    repair(app.engine, app.queue, grace_seconds=5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(apps))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    app = apps[0]
    jobs = lifecycle.list_jobs(app.engine, limit=None)
    assert len(jobs) == 20
    assert entries_per_job(app.queue) == {j["id"]: 1 for j in jobs}
    # Every row records the one entry that exists for it.
    ids = {entry_id for entry_id, _ in app.queue.client.xrange(app.queue.stream)}
    assert {j["stream_id"] for j in jobs} == ids
    assert app.dispatcher(LocalExecutor()).run(drain=True).done == 20


def test_nightly_racing_a_submit_enqueues_once(tmp_path, digits_models, fault_stack):
    app = _app(tmp_path, fault_stack)
    suite = fgsm_suite(tmp_path, 12)
    submit_digits(app, digits_models["standard"], suite=suite)
    for job in lifecycle.list_jobs(app.engine, limit=None):
        app.queue.client.xdel(app.queue.stream, job["stream_id"])
    with app.engine.begin() as conn:  # as if every XADD of that submit had been lost
        conn.exec_driver_sql("UPDATE jobs SET stream_id = NULL")
    other = _app(tmp_path, fault_stack)
    start = threading.Barrier(2)

    def run_nightly():
        start.wait()
        nightly(other.engine, other.queue, other.redis, prefix=other.settings.redis_prefix)

    thread = threading.Thread(target=run_nightly)
    thread.start()
    start.wait()
    enqueue_new(app.engine, app.queue)
    thread.join()
    jobs = lifecycle.list_jobs(app.engine, limit=None)
    assert entries_per_job(app.queue) == {j["id"]: 1 for j in jobs}


def test_enqueue_markers_young_and_stale(tmp_path, digits_models, fault_stack):
    """A marker means an enqueue under way; only one older than the grace is repaired."""
    app = _app(tmp_path, fault_stack)
    specs = expand_suite(fgsm_suite(tmp_path, 3), "m" * 64, "digits")
    add_model(app.engine, "m" * 64, "m", arch="small-cnn")
    young, old, written = lifecycle.insert_jobs(app.engine, new_jobs(specs, "s"))
    stale_marker = "pending:1000:abc"  # written in 1970: its enqueuer is long dead
    entry = app.queue.enqueue(written)  # XADDed, but its id never reached SQL
    with app.engine.begin() as conn:
        for job_id, value in ((young, new_marker()), (old, stale_marker), (written, stale_marker)):
            conn.execute(sa.update(Job).where(Job.id == job_id).values(stream_id=value))
    stranded = {s.job_id: s for s in find_stranded(app.engine, app.queue, grace_seconds=30)}
    assert set(stranded) == {old, written}
    assert stranded[written].found_entry == entry
    report = repair(app.engine, app.queue, grace_seconds=30)
    assert report.enqueued == [old] and report.adopted == [written]
    assert lifecycle.get_job(app.engine, written)["stream_id"] == entry
    # A rival that read the row before the marker was written loses the compare-and-set.
    assert enqueue_once(app.engine, app.queue, young, seen=None) is None
    assert entries_per_job(app.queue) == {old: 1, written: 1}


def test_repair_requeues_an_abandoned_running_job(tmp_path, digits_models, fault_stack):
    """Running, lease expired, entry gone: back to queued with one new entry."""
    app = _app(tmp_path, fault_stack)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, 2))
    (entry, _) = app.queue.read("crashed", count=2)
    claim = lifecycle.claim(app.engine, entry.job_id, "crashed", lease_seconds=0.2)
    assert claim is not None
    app.queue.ack(entry.entry_id)  # the entry is lost while the job "runs"
    assert find_stranded(app.engine, app.queue) == []  # lease still alive
    time.sleep(0.4)
    (lost,) = find_stranded(app.engine, app.queue)
    assert lost.status == "running" and "lease expired" in lost.reason
    assert repair(app.engine, app.queue).enqueued == [entry.job_id]
    assert lifecycle.get_job(app.engine, entry.job_id)["lease_owner"] is None
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert statuses(app.engine) == {"done": 2} and stats.failed == 0
