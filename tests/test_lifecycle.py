"""The job lifecycle on SQLite and PostgreSQL: inserts, claims, leases, fencing."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db import JobStatus, MetricRow, Outcome, open_database
from gauntlet.scheduler import lifecycle
from gauntlet.workers.results import JobResult, Metric, pack
from tests.service_helpers import add_model

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
MODEL_ID = "a" * 64


@pytest.fixture
def engine(db_url: str):
    engine = open_database(db_url, auto_upgrade=True)
    add_model(engine, MODEL_ID, "tiny-mlp", input_spec={"channels": 1, "height": 8, "width": 8})
    yield engine
    engine.dispose()


def new_job(key: str, attack: str = "pgd", eps: float | None = 0.1) -> lifecycle.NewJob:
    return lifecycle.NewJob(
        job_key=key,
        model_id=MODEL_ID,
        kind="eval",
        suite="quick",
        spec={"attack": attack, "eps": eps, "resources": {"num_gpus": 0}},
        dataset="digits",
        attack=attack,
        norm="linf" if eps is not None else None,
        eps=eps,
        subset_key="digits:test:16:0",
    )


def result(robust_accuracy: float, host: str = "node-1") -> JobResult:
    clean = [True] * 15 + [False]
    robust = [i < 8 for i in range(16)]
    return JobResult(
        metrics=[
            Metric("clean_accuracy", 15 / 16, 16, 0.7, 0.99),
            Metric("robust_accuracy", robust_accuracy, 16),
        ],
        n=16,
        clean=pack(clean),
        robust=pack(robust),
        worker_host=host,
        device="cpu",
        code_version="abc123",
        seconds=1.5,
    )


def rows(engine: sa.Engine, table, job_id: int) -> list:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table).where(table.job_id == job_id)))


def test_upsert_model_inserts_once(engine: sa.Engine) -> None:
    again = add_model(engine, MODEL_ID, "renamed")
    assert again is False
    assert [m["name"] for m in lifecycle.list_models(engine)] == ["tiny-mlp"]
    child = add_model(engine, "c" * 64, "tiny-mlp-at", weights_sha256="d" * 64, parent_id=MODEL_ID)
    assert child is True
    assert lifecycle.list_models(engine)[1]["parent_id"] == MODEL_ID


def test_insert_jobs_twice_inserts_once(engine: sa.Engine) -> None:
    first = lifecycle.insert_jobs(engine, [new_job("k1"), new_job("k2"), new_job("k1")])
    assert len(first) == 2
    second = lifecycle.insert_jobs(engine, [new_job("k2"), new_job("k3")])
    assert len(second) == 1 and second[0] not in first
    assert lifecycle.insert_jobs(engine, []) == []
    assert len(lifecycle.list_jobs(engine)) == 3
    assert lifecycle.done_job_keys(engine, ["k1", "k3", "k9"]) == {"k1", "k3"}
    job = lifecycle.get_job(engine, first[0])
    assert job["spec"]["attack"] == "pgd" and job["status"] == JobStatus.queued
    assert job["model"] == "tiny-mlp" and job["attempts"] == 0


def test_unenqueued_until_marked(engine: sa.Engine) -> None:
    ids = lifecycle.insert_jobs(engine, [new_job("k1"), new_job("k2")])
    assert lifecycle.unenqueued_jobs(engine) == ids
    lifecycle.mark_enqueued(engine, ids[0], "1700000000000-0")
    assert lifecycle.unenqueued_jobs(engine) == [ids[1]]


def test_two_claims_one_wins(engine: sa.Engine) -> None:
    (job_id,) = lifecycle.insert_jobs(engine, [new_job("k1")])
    won = lifecycle.claim(engine, job_id, "sched-a", 60, now=T0)
    assert won is not None and won.attempt == 1 and won.owner == "sched-a"
    assert won.spec["attack"] == "pgd" and won.model["arch"] == "mlp"
    assert set(won.model) == {"id", "name", "arch", "dataset", "input_spec", "weights_sha256"}
    assert lifecycle.claim(engine, job_id, "sched-b", 60, now=T0 + timedelta(seconds=59)) is None
    assert lifecycle.job_status(engine, job_id) == JobStatus.running


def test_racing_claims_one_wins(engine: sa.Engine) -> None:
    (job_id,) = lifecycle.insert_jobs(engine, [new_job("k1")])
    barrier, claims = threading.Barrier(8), []

    def race(owner: str) -> None:
        barrier.wait()
        claims.append(lifecycle.claim(engine, job_id, owner, 60))

    threads = [threading.Thread(target=race, args=(f"s{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [c for c in claims if c is not None]
    assert len(claims) == 8 and len(winners) == 1
    assert lifecycle.get_job(engine, job_id)["lease_owner"] == winners[0].owner


def test_expired_lease_is_reclaimed_and_the_stale_owner_is_fenced(engine: sa.Engine) -> None:
    (job_id,) = lifecycle.insert_jobs(engine, [new_job("k1")])
    stale = lifecycle.claim(engine, job_id, "sched-a", 10, now=T0)
    assert lifecycle.renew(engine, job_id, "sched-a", 1, 10, now=T0 + timedelta(seconds=5))
    # Renewed to T0+15s: at T0+12s the lease is still alive, at T0+16s it has lapsed.
    assert lifecycle.claim(engine, job_id, "sched-b", 10, now=T0 + timedelta(seconds=12)) is None
    fresh = lifecycle.claim(engine, job_id, "sched-b", 10, now=T0 + timedelta(seconds=16))
    assert stale.attempt == 1 and fresh is not None and fresh.attempt == 2

    assert not lifecycle.renew(engine, job_id, "sched-a", 1, 10)
    assert not lifecycle.finish(engine, job_id, "sched-a", 1, result(0.5, host="stale"))
    assert not lifecycle.fail(engine, job_id, "sched-a", 1, "boom", permanent=True)
    assert rows(engine, MetricRow, job_id) == [] and rows(engine, Outcome, job_id) == []
    job = lifecycle.get_job(engine, job_id)
    assert job["status"] == JobStatus.running and job["lease_owner"] == "sched-b"

    assert lifecycle.finish(engine, job_id, "sched-b", 2, result(0.5))
    metrics = {row.name: row for row in rows(engine, MetricRow, job_id)}
    assert set(metrics) == {"clean_accuracy", "robust_accuracy"}
    assert metrics["clean_accuracy"].value == 15 / 16 and metrics["clean_accuracy"].n == 16
    assert (metrics["clean_accuracy"].ci_low, metrics["robust_accuracy"].ci_low) == (0.7, None)
    (outcome,) = rows(engine, Outcome, job_id)
    assert outcome.n == 16 and outcome.robust == pack([i < 8 for i in range(16)])
    job = lifecycle.get_job(engine, job_id)
    assert job["status"] == JobStatus.done and job["worker_host"] == "node-1"
    assert job["seconds"] == 1.5 and job["code_version"] == "abc123" and job["error"] is None
    assert job["finished_at"] is not None and job["lease_expires_at"] is None
    # Finishing again with the same claim is fenced: the job is no longer running.
    assert not lifecycle.finish(engine, job_id, "sched-b", 2, result(0.25))
    assert len(rows(engine, MetricRow, job_id)) == 2


def test_a_rerun_replaces_metrics_rather_than_duplicating_them(engine: sa.Engine) -> None:
    (job_id,) = lifecycle.insert_jobs(engine, [new_job("k1")])
    lifecycle.mark_enqueued(engine, job_id, "1-0")
    first = lifecycle.claim(engine, job_id, "sched-a", 60)
    assert lifecycle.finish(engine, job_id, "sched-a", first.attempt, result(0.5))
    assert lifecycle.requeue(engine, job_id)
    assert lifecycle.unenqueued_jobs(engine) == [job_id]  # the rerun needs a stream entry
    second = lifecycle.claim(engine, job_id, "sched-a", 60)
    assert second.attempt == 2
    assert not lifecycle.finish(engine, job_id, "sched-a", 1, result(0.75))  # old attempt
    assert lifecycle.finish(engine, job_id, "sched-a", 2, result(0.25))
    values = {row.name: row.value for row in rows(engine, MetricRow, job_id)}
    assert values == {"clean_accuracy": 15 / 16, "robust_accuracy": 0.25}
    assert len(rows(engine, Outcome, job_id)) == 1
    assert not lifecycle.requeue(engine, lifecycle.insert_jobs(engine, [new_job("k2")])[0])


def test_finish_refuses_bitsets_of_the_wrong_size(engine: sa.Engine) -> None:
    (job_id,) = lifecycle.insert_jobs(engine, [new_job("k1")])
    claim = lifecycle.claim(engine, job_id, "sched-a", 60)
    bad = result(0.5)
    bad.n = 30
    with pytest.raises(ValueError, match="Expected outcome bitsets of 4 bytes"):
        lifecycle.finish(engine, job_id, "sched-a", claim.attempt, bad)
    assert lifecycle.job_status(engine, job_id) == JobStatus.running


def test_transient_failure_requeues_and_permanent_failure_fails(engine: sa.Engine) -> None:
    (job_id,) = lifecycle.insert_jobs(engine, [new_job("k1")])
    lifecycle.mark_enqueued(engine, job_id, "1-0")
    claim = lifecycle.claim(engine, job_id, "sched-a", 60)
    assert lifecycle.fail(
        engine, job_id, "sched-a", claim.attempt, "ray node lost", permanent=False
    )
    job = lifecycle.get_job(engine, job_id)
    assert job["status"] == JobStatus.queued and job["error"] == "ray node lost"
    assert job["lease_owner"] is None and job["lease_expires_at"] is None
    assert job["stream_id"] == "1-0"  # retried through its existing entry

    claim = lifecycle.claim(engine, job_id, "sched-b", 60)
    assert claim.attempt == 2
    assert lifecycle.fail(engine, job_id, "sched-b", 2, "shape mismatch", permanent=True)
    job = lifecycle.get_job(engine, job_id)
    assert job["status"] == JobStatus.failed and job["error"] == "shape mismatch"
    assert job["finished_at"] is not None
    assert lifecycle.claim(engine, job_id, "sched-c", 60) is None


def test_dead_lettered_jobs_fail_but_done_jobs_stay_done(engine: sa.Engine) -> None:
    running, done = lifecycle.insert_jobs(engine, [new_job("k1"), new_job("k2")])
    lifecycle.claim(engine, running, "sched-a", 60)
    lifecycle.fail_dead_lettered(engine, running, "delivered 3 times")
    assert lifecycle.get_job(engine, running)["error"] == "delivered 3 times"
    assert lifecycle.job_status(engine, running) == JobStatus.failed
    claim = lifecycle.claim(engine, done, "sched-a", 60)
    lifecycle.finish(engine, done, "sched-a", claim.attempt, result(0.5))
    lifecycle.fail_dead_lettered(engine, done, "late")
    assert lifecycle.job_status(engine, done) == JobStatus.done


def test_list_jobs_filters(engine: sa.Engine) -> None:
    add_model(engine, "f" * 64, "other", arch="cnn", dataset="mnist", weights_sha256="e" * 64)
    ids = lifecycle.insert_jobs(engine, [new_job("k1"), new_job("k2", attack="clean", eps=None)])
    other = lifecycle.NewJob(**{**vars(new_job("k3")), "model_id": "f" * 64, "dataset": "mnist"})
    lifecycle.insert_jobs(engine, [other])
    lifecycle.claim(engine, ids[0], "sched-a", 60)
    assert [j["id"] for j in lifecycle.list_jobs(engine, model="aaaa")] == ids[::-1]
    assert [j["job_key"] for j in lifecycle.list_jobs(engine, model="other")] == ["k3"]
    assert [j["job_key"] for j in lifecycle.list_jobs(engine, model="a%")] == []
    assert [j["job_key"] for j in lifecycle.list_jobs(engine, status="running")] == ["k1"]
    assert [j["job_key"] for j in lifecycle.list_jobs(engine, dataset="mnist")] == ["k3"]
    assert len(lifecycle.list_jobs(engine, limit=2)) == 2
    assert "spec" not in lifecycle.list_jobs(engine)[0]
    with pytest.raises(GauntletError, match="no job 999"):
        lifecycle.job_status(engine, 999)
