"""Only a job's own failure counts, and no entry can stop a scheduler.

A scheduler killed again and again must not use up its jobs' retries; an entry that
cannot be handled (no such job, an unreadable spec, a result that cannot be stored, a
derived model that cannot be registered) fails that one job with its message and the
loop goes on; ``--local`` keeps renewing leases while a job runs.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import sqlalchemy as sa

from gauntlet.db.schema import Job
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.train import request_training
from gauntlet.workers.attacks import register_attack
from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.results import JobResult
from tests.outage_helpers import start_scheduler
from tests.queue_helpers import (
    entries_per_job,
    fgsm_suite,
    metric_sets,
    register_sleeper,
    status,
    statuses,
)
from tests.service_helpers import make_app, submit_digits

# Takes several leases to finish (and fools nothing).
register_sleeper("test-sleepy", 1.2)


@register_attack
class Flaky(Attack):
    """Fails its first two tries with a transient error, then succeeds."""

    name = "test-flaky"
    needs_threat = False
    tries: dict = {}

    def run(self, model, x, y, threat, generator):
        key = tuple(y.tolist())
        Flaky.tries[key] = Flaky.tries.get(key, 0) + 1
        if Flaky.tries[key] <= 2:
            raise RuntimeError("lost its node")
        return RunOutput(x_adv=x, fooled=x.new_zeros(len(x), dtype=bool))


@pytest.mark.parametrize("limit, expected", [(3, "done"), (2, "failed")])
def test_own_failures_are_counted_in_sql(tmp_path, digits_models, stack, limit, expected):
    Flaky.tries.clear()
    app = make_app(
        tmp_path / "home", **stack, GAUNTLET_LEASE_SECONDS=0.3, GAUNTLET_MAX_DELIVERIES=limit
    )
    suite = tmp_path / "flaky.yaml"
    suite.write_text("n: 20\nevaluations:\n  - attack: test-flaky\n")
    submit_digits(app, digits_models["standard"], suite=str(suite))
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    (job,) = lifecycle.list_jobs(app.engine)
    assert status(job) == expected
    assert job["failures"] == 2
    if expected == "failed":
        # One retry after the lease, then the second failure reaches the limit.
        assert (stats.retried, stats.dead, job["attempts"]) == (1, 1, 2)
        assert job["error"] == "gave up after 2 failures: RuntimeError: lost its node"
        assert [d["job_id"] for d in app.queue.dead_letters()] == [job["id"]]
    else:
        # Two transient failures, each retried after the lease, then success.
        assert (stats.retried, stats.done, job["attempts"]) == (2, 1, 3)
        assert app.queue.dead_letters() == []
    assert app.queue.is_empty()


def test_sigkilled_schedulers_use_up_no_retries(tmp_path, digits_models, stack):
    """Kill a real scheduler ten times during 50 jobs: all done once, none failed."""
    app = make_app(tmp_path / "home", **stack, GAUNTLET_LEASE_SECONDS=1, GAUNTLET_MAX_DELIVERIES=2)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, 50))
    env = {"GAUNTLET_LEASE_SECONDS": "1", "GAUNTLET_MAX_DELIVERIES": "2", **stack}
    kills = 0
    for _ in range(10):
        before = statuses(app.engine)["done"]
        proc = start_scheduler(app.settings.home, env)
        try:
            # Kill it in the middle of its work: after its first results, while others
            # run. (A scheduler may store several at once, so the first is the cue.)
            deadline = time.monotonic() + 90
            while statuses(app.engine)["done"] < min(before + 1, 50):
                assert proc.poll() is None, (app.settings.home / "scheduler.log").read_text()
                assert time.monotonic() < deadline, "the scheduler made no progress"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.log_file.close()
        if statuses(app.engine)["done"] == 50:
            break
    assert kills == 10
    app.dispatcher(LocalExecutor()).run(drain=True)
    jobs = lifecycle.list_jobs(app.engine, limit=None)
    assert statuses(app.engine) == {"done": 50}
    assert all(j["failures"] == 0 for j in jobs)
    assert app.queue.dead_letters() == []
    names = metric_sets(app.engine)
    assert all(len(names[j["id"]]) == len(set(names[j["id"]])) > 0 for j in jobs)
    assert app.queue.is_empty()
    # The kills did cost deliveries: some jobs were claimed more than once.
    assert any(j["attempts"] > 1 for j in jobs)


def test_poison_entries_fail_their_job_and_the_loop_goes_on(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_LEASE_SECONDS=1)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, 3))
    bad_spec, bad_result, good = (j["id"] for j in reversed(lifecycle.list_jobs(app.engine)))
    app.queue.enqueue(10**9)  # no such job
    with app.engine.begin() as conn:  # valid JSON, but no spec a scheduler can read
        conn.execute(sa.update(Job).where(Job.id == bad_spec).values(spec=["not", "a", "spec"]))

    class Corrupting(LocalExecutor):
        """Hands back one result whose outcome bitsets do not match its n."""

        def outcome(self, handle):
            value = super().outcome(handle)
            if handle.job_id == bad_result and isinstance(value, JobResult):
                value.clean = b""
            return value

    events = []
    stats = app.dispatcher(
        Corrupting(), on_event=lambda kind, job_id, msg: events.append((kind, job_id, msg))
    ).run(drain=True)
    assert status(lifecycle.get_job(app.engine, good)) == "done"
    spec_job = lifecycle.get_job(app.engine, bad_spec)
    assert status(spec_job) == "failed"
    assert spec_job["error"].startswith("could not start the job: AttributeError")
    result_job = lifecycle.get_job(app.engine, bad_result)
    assert status(result_job) == "failed"
    assert result_job["error"].startswith("could not store the result: ValueError")
    (letter,) = app.queue.dead_letters()
    assert letter["job_id"] == 10**9 and "no job" in letter["reason"]
    assert (stats.done, stats.failed, stats.dead) == (1, 2, 1)
    assert app.queue.is_empty()


def test_unparsable_spec_on_sqlite(tmp_path, digits_models):
    """SQLite keeps JSON as text, so a row can hold text that is not JSON at all."""
    app = make_app(tmp_path / "home", GAUNTLET_LEASE_SECONDS=1)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, 2))
    broken, good = (j["id"] for j in reversed(lifecycle.list_jobs(app.engine)))
    with app.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET spec = '{not json' WHERE id = ?", (broken,))
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert (stats.done, stats.failed) == (1, 1)
    with app.engine.connect() as conn:
        error = conn.scalar(sa.select(Job.error).where(Job.id == broken))
    assert error.startswith("could not start the job: JSONDecodeError")
    assert status(lifecycle.get_job(app.engine, good)) == "done"


def _train_setup(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_LEASE_SECONDS=2)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, 1), name="base")
    suite = tmp_path / "elsewhere" / "derived.yaml"
    suite.parent.mkdir()
    suite.write_text("n: 20\nevaluations:\n  - attack: clean\n")
    params = {"eps": 0.1, "epochs": 1, "suite": str(suite)}
    job_id, _ = request_training(app.engine, app.queue, "base", "fgsm-at", params, n=20)
    return app, suite, job_id


def test_train_job_suite_is_read_when_requested(tmp_path, digits_models, stack):
    """The suite file is gone by the time the job finishes: its definition is stored."""
    app, suite, job_id = _train_setup(tmp_path, digits_models, stack)
    suite.unlink()
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert stats.failed == 0
    derived = [m for m in lifecycle.list_models(app.engine) if m["parent_id"]]
    assert [m["name"] for m in derived] == ["base+fgsm-at"]
    evaluated = lifecycle.list_jobs(app.engine, model=derived[0]["id"])
    assert [(j["attack"], status(j)) for j in evaluated] == [("clean", "done")]


def test_unregistrable_derived_model_fails_its_job(tmp_path, digits_models, stack):
    """An older train job that names a suite file gone from this host: failed, not a crash."""
    app, suite, job_id = _train_setup(tmp_path, digits_models, stack)
    spec = lifecycle.get_job(app.engine, job_id)["spec"]
    spec["params"]["suite"] = str(suite)  # how train jobs were stored before
    with app.engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == job_id).values(spec=spec))
    suite.unlink()
    submit_digits(app, digits_models["robust"], suite=fgsm_suite(tmp_path, 1))
    stats = app.dispatcher(LocalExecutor(), max_in_flight=1).run(drain=True)
    job = lifecycle.get_job(app.engine, job_id)
    assert status(job) == "failed"
    assert job["error"].startswith("trained, but registering the derived model failed")
    assert "does not exist" in job["error"]
    assert statuses(app.engine) == {"done": 2, "failed": 1}  # the others still ran
    assert stats.failed == 1 and app.queue.is_empty()


def test_local_replicas_renew_leases_while_jobs_run(tmp_path, digits_models, stack):
    """Jobs of three leases each on two --local replicas: none is taken over."""
    lease = 0.4
    apps = [make_app(tmp_path / "home", **stack, GAUNTLET_LEASE_SECONDS=lease) for _ in "ab"]
    suite = tmp_path / "sleepy.yaml"
    suite.write_text("n: 10\nevaluations:\n  - attack: test-sleepy\n")
    for n in (10, 11, 12, 13):  # one job each: a subset size is part of the job key
        submit_digits(apps[0], digits_models["standard"], suite=str(suite), n=n)
    events: list[tuple[str, int, str]] = []
    results = []

    def replica(app):
        dispatcher = app.dispatcher(
            LocalExecutor(), max_in_flight=2, on_event=lambda *e: events.append(e)
        )
        results.append(dispatcher.run(drain=True))

    threads = [threading.Thread(target=replica, args=(app,)) for app in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = lifecycle.list_jobs(apps[0].engine, limit=None)
    assert statuses(apps[0].engine) == {"done": 4}
    assert [j["attempts"] for j in jobs] == [1, 1, 1, 1]
    assert not [e for e in events if e[0] == "fenced"]  # no result thrown away
    assert sum(r.done for r in results) == 4
    assert entries_per_job(apps[0].queue) == {}
