"""Every job has a time limit, and a cancelled job stops its task.

A job past its limit fails for good with a message that says so, and the next job
runs; a fan-out's children share their parent's deadline; a job an operator cancelled
in SQL has its task stopped at the next lease renewal, with nothing written over it.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job, JobStatus, utcnow
from gauntlet.scheduler import deadlines, lifecycle
from gauntlet.scheduler.executors import LocalExecutor, RayExecutor
from gauntlet.scheduler.spec import JobSpec
from gauntlet.scheduler.submit import enqueue_new, new_jobs
from gauntlet.scheduler.suites import parse_suite
from gauntlet.workers import fanout
from gauntlet.workers.jobs import job_kind
from tests.outage_helpers import wait_until
from tests.queue_helpers import register_sleeper, status
from tests.service_helpers import make_app, submit_digits

# Takes far longer than any limit a test sets (and fools nothing).
register_sleeper("test-stalling", 20)


def _suite(tmp_path, body: str) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text("n: 20\nevaluations:\n" + body)
    return str(path)


def _by_attack(app) -> dict[str, dict]:
    return {j["attack"]: j for j in lifecycle.list_jobs(app.engine, limit=None)}


def test_a_job_past_its_limit_fails_and_the_next_one_runs(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_LEASE_SECONDS=1)
    body = "  - {attack: test-stalling, timeout_s: 2}\n  - {attack: fgsm, norm: linf, eps: 0.1}\n"
    submit_digits(app, digits_models["standard"], suite=_suite(tmp_path, body))
    started = time.monotonic()
    stats = app.dispatcher(LocalExecutor(), max_in_flight=2).run(drain=True)
    assert time.monotonic() - started < 15  # not the 20 s the attack would take
    jobs = _by_attack(app)
    slow, quick = jobs["test-stalling"], jobs["fgsm"]
    assert status(slow) == "failed" and slow["failures"] == 0 and slow["attempts"] == 1
    assert slow["error"].startswith("timed out after ") and slow["error"].endswith("(limit 2 s)")
    assert status(quick) == "done"
    assert (stats.timed_out, stats.failed, stats.done, stats.retried) == (1, 1, 1, 0)
    assert app.queue.is_empty() and app.queue.dead_letters() == []


def test_limits_come_from_the_suite_the_kind_and_the_cap():
    spec = {"kind": "eval"}
    assert deadlines.limit_s(spec) == job_kind("eval").time_limit_s == 7200
    assert deadlines.limit_s({"kind": "train"}) == 12 * 3600
    assert deadlines.limit_s({"kind": "pate", "timeout_s": 30}) == 30
    assert deadlines.limit_s({"kind": "train"}, cap=600) == 600
    assert deadlines.limit_s({"kind": "eval", "timeout_s": 10**6}, cap=3600) == 3600


def test_timeout_is_part_of_the_spec_but_not_of_the_job_key():
    common = dict(model_id="m" * 64, dataset="digits", attack="fgsm", norm="linf", eps=0.1)
    plain, limited = JobSpec(**common), JobSpec(**common, timeout_s=5)
    assert plain.key == limited.key
    # Pinned: job keys written before time limits existed must not change.
    assert plain.key == "521b01eda4054dd0c32f94e96de3efd1bfb02c1f57c3d785562edea86687117a"
    assert limited.to_dict()["timeout_s"] == 5
    assert JobSpec.from_dict({k: v for k, v in plain.to_dict().items() if k != "timeout_s"})


@pytest.mark.parametrize("value", ["soon", 0, -1, True, [5]])
def test_suite_timeout_is_checked(value):
    data = {"n": 10, "evaluations": [{"attack": "fgsm", "norm": "linf", "timeout_s": value}]}
    with pytest.raises(GauntletError, match=r"evaluation 1 \(fgsm\): Expected `timeout_s`"):
        parse_suite(data, "mine")


def test_in_process_fan_out_stops_at_the_deadline():
    calls = []

    def piece(i):
        calls.append(i)
        time.sleep(0.3)
        return i

    pieces = [(f"teacher-{i}", (i,)) for i in range(10)]
    with fanout.job_deadline(time.time() + 0.5, 0.5):
        with pytest.raises(fanout.JobTimeout, match=r"timed out after 1 s \(limit 0.5 s\)"):
            fanout.run_parallel(piece, pieces)
    assert len(calls) == 2  # the rest never started


def test_cancelled_by_the_operator_stops_the_task(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_LEASE_SECONDS=1)
    body = "  - {attack: test-stalling}\n  - {attack: fgsm, norm: linf, eps: 0.1}\n"
    submit_digits(app, digits_models["standard"], suite=_suite(tmp_path, body))
    slow = _by_attack(app)["test-stalling"]["id"]
    events = []
    dispatcher = app.dispatcher(
        LocalExecutor(), max_in_flight=1, on_event=lambda *e: events.append(e)
    )
    started = time.monotonic()

    def cancel_when_running():
        job = lifecycle.get_job(app.engine, slow)
        if status(job) != "running":
            return False
        with app.engine.begin() as conn:
            conn.execute(
                sa.update(Job)
                .where(Job.id == slow, Job.status == JobStatus.running)
                .values(
                    status=JobStatus.failed,
                    error="cancelled by the operator",
                    finished_at=utcnow(),
                    lease_expires_at=None,
                )
            )
        return True

    cancelled = []

    def should_stop():
        if not cancelled and cancel_when_running():
            cancelled.append(time.monotonic())
        return False

    stats = dispatcher.run(drain=True, should_stop=should_stop)
    assert cancelled and time.monotonic() - started < 15
    job = lifecycle.get_job(app.engine, slow)
    assert status(job) == "failed" and job["error"] == "cancelled by the operator"
    assert stats.cancelled == 1 and stats.failed == 0 and stats.done == 1
    assert ("cancelled", slow) in [(kind, job_id) for kind, job_id, _ in events]
    assert slow not in dispatcher.running
    assert app.queue.is_empty()


# -- on Ray: the fan-out of a PATE job, and a cancel that kills the task's worker -------

PATE = {"teachers": 2, "epochs": 10_000, "queries": 20}  # teachers that never finish


def _insert_pate(app, model_id: str, **extra) -> int:
    spec = JobSpec(
        model_id=model_id, dataset="digits", attack="gnmax", params=PATE, kind="pate", n=20, **extra
    )
    spec.validate()
    (job_id,) = lifecycle.insert_jobs(app.engine, new_jobs([spec], None))
    enqueue_new(app.engine, app.queue)
    return job_id


def _model_id(app, digits_models, tmp_path) -> str:
    clean = _suite(tmp_path, "  - {attack: clean}\n")
    model_id = submit_digits(app, digits_models["standard"], name="base", suite=clean).model_id
    app.dispatcher(LocalExecutor()).run(drain=True)  # the clean job, out of the way
    return model_id


def _cpus_free(ray) -> bool:
    return ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU")


@pytest.mark.ray
def test_pate_children_past_the_deadline_fail_the_parent(tmp_path, digits_models, ray_local):
    app = make_app(tmp_path / "home", GAUNTLET_LEASE_SECONDS=2)
    job_id = _insert_pate(app, _model_id(app, digits_models, tmp_path), timeout_s=10)
    stats = app.dispatcher(RayExecutor(), max_in_flight=2).run(drain=True)
    job = lifecycle.get_job(app.engine, job_id)
    assert status(job) == "failed" and job["failures"] == 0
    # The parent's own message: it noticed, and cancelled the teachers still training.
    assert job["error"].startswith("timed out after "), job["error"]
    assert "(limit 10 s): 2 of 2 sub-tasks were still running, cancelled" in job["error"]
    assert stats.failed == 1 and stats.timed_out == 0
    wait_until(lambda: _cpus_free(ray_local), 20, "the teachers' CPUs to be released")


@pytest.mark.ray
def test_cancel_kills_the_ray_task(tmp_path, digits_models, ray_local):
    app = make_app(tmp_path / "home", GAUNTLET_LEASE_SECONDS=1)
    job_id = _insert_pate(app, _model_id(app, digits_models, tmp_path))
    dispatcher = app.dispatcher(RayExecutor(), max_in_flight=2)

    def cancel_soon():
        if job_id in dispatcher.running and not _cpus_free(ray_local):
            with app.engine.begin() as conn:
                conn.execute(
                    sa.update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.running)
                    .values(status=JobStatus.failed, error="cancelled by the operator")
                )
        return False

    stats = dispatcher.run(drain=True, should_stop=cancel_soon)
    assert stats.cancelled == 1 and not dispatcher.running
    assert lifecycle.get_job(app.engine, job_id)["error"] == "cancelled by the operator"
    wait_until(lambda: _cpus_free(ray_local), 20, "the killed task's CPUs to be released")
