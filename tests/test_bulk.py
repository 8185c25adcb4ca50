"""Batched claims and result writes: the same fencing as one job at a time, on both databases."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from gauntlet.db import JobStatus, MetricRow, Outcome
from gauntlet.scheduler import bulk, lifecycle
from tests.test_lifecycle import T0, engine, new_job, result, rows  # noqa: F401 - fixture

__all__ = ["engine"]


def test_claim_many_takes_what_claim_would_and_nothing_held(engine):  # noqa: F811
    ids = lifecycle.insert_jobs(engine, [new_job(f"k{i}") for i in range(5)])
    # One held by another replica with a live lease, one finished, one lapsed lease.
    assert lifecycle.claim(engine, ids[0], "other", 60, now=T0)
    assert lifecycle.claim(engine, ids[1], "other", 60, now=T0)
    assert lifecycle.finish(engine, ids[1], "other", 1, result(0.5))
    assert lifecycle.claim(engine, ids[2], "other", 1, now=T0)
    later = T0 + timedelta(seconds=5)
    claims = bulk.claim_many(engine, ids, "me", 30, now=later)
    assert sorted(claims) == [ids[2], ids[3], ids[4]]
    assert claims[ids[2]].attempt == 2 and claims[ids[3]].attempt == 1
    assert claims[ids[3]].model["id"] == "a" * 64 and claims[ids[3]].spec["attack"] == "pgd"
    jobs = bulk.get_jobs(engine, ids)
    assert jobs[ids[0]]["lease_owner"] == "other"
    assert {jobs[i]["lease_owner"] for i in claims} == {"me"}
    # A second claim of the same jobs finds nothing left to take.
    assert bulk.claim_many(engine, ids, "third", 30, now=later) == {}


def test_finish_many_stores_each_result_behind_its_own_fence(engine):  # noqa: F811
    ids = lifecycle.insert_jobs(engine, [new_job(f"f{i}") for i in range(3)])
    claims = bulk.claim_many(engine, ids, "me", 60, now=T0)
    # The second job was cancelled and re-claimed by another replica meanwhile.
    lifecycle.fail(engine, ids[1], "me", claims[ids[1]].attempt, "cancelled", permanent=True)
    stored = bulk.finish_many(
        engine,
        "me",
        [(i, claims[i].attempt, result(0.25 * (n + 1), host=f"h{n}")) for n, i in enumerate(ids)],
    )
    assert stored == {ids[0], ids[2]}
    for n, job_id in ((0, ids[0]), (2, ids[2])):
        job = lifecycle.get_job(engine, job_id)
        assert job["status"] == JobStatus.done and job["worker_host"] == f"h{n}"
        values = {r.name: r.value for r in rows(engine, MetricRow, job_id)}
        assert values == {"clean_accuracy": 15 / 16, "robust_accuracy": 0.25 * (n + 1)}
        assert len(rows(engine, Outcome, job_id)) == 1
    assert lifecycle.get_job(engine, ids[1])["status"] == JobStatus.failed
    assert rows(engine, MetricRow, ids[1]) == []
    # Storing the same results again (a duplicate delivery) is fenced out entirely.
    again = [(i, claims[i].attempt, result(0.9)) for i in ids]
    assert bulk.finish_many(engine, "me", again) == set()
    with engine.connect() as conn:
        count = conn.scalar(sa.select(sa.func.count()).select_from(MetricRow))
    assert count == 4
