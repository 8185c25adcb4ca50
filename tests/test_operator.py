"""The operator's commands against real queues: cancel, rerun, queue, queue repair, job,
jobs --watch. Each runs on the embedded stack and on the PostgreSQL + Redis servers."""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gauntlet.cluster import redis_conn
from gauntlet.db.schema import Job
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.cli import main
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.operator import CANCELLED
from gauntlet.scheduler.queue import progress_key
from gauntlet.workers.task import _progress_reporter
from tests.queue_helpers import entries_per_job, fgsm_suite, status
from tests.service_helpers import make_app, submit_digits


@pytest.fixture
def app(tmp_path, stack):
    return make_app(tmp_path / "home", **stack)


@pytest.fixture
def cli(tmp_path, stack):
    """Run ``gauntlet ARGS...`` on the same database and Redis as ``app``."""
    runner = CliRunner()
    env = {"GAUNTLET_HOME": str(tmp_path / "home"), "GAUNTLET_LEASE_SECONDS": "2", **stack}

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _one_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0], result.output


def _submit(app, tmp_path, weights, count: int, **options) -> list[int]:
    suite = fgsm_suite(tmp_path, count, n=20)
    submit_digits(app, weights, suite=suite, **options)
    model = options.get("name", weights.stem)
    return sorted(j["id"] for j in lifecycle.list_jobs(app.engine, model=model, limit=None))


def _drain(app):
    return app.dispatcher(LocalExecutor()).run(drain=True)


def _job(app, job_id: int) -> dict:
    return lifecycle.get_job(app.engine, job_id)


def test_cancel_a_queued_job_and_nothing_runs_it(app, cli, tmp_path, digits_models):
    first, second, third = _submit(app, tmp_path, digits_models["standard"], 3)
    report = _json(cli("cancel", first, "--json"))
    assert report["cancelled"] == [first] and report["entries_removed"] == 1
    job = _job(app, first)
    assert (status(job), job["error"]) == ("failed", CANCELLED)
    assert first not in entries_per_job(app.queue)

    stats = _drain(app)
    assert stats.done == 2 and stats.skipped == 0  # no delivery of the cancelled job
    assert status(_job(app, first)) == "failed"
    assert {status(_job(app, j)) for j in (second, third)} == {"done"}
    # Finished jobs are reported, not an error, beside the ones that are cancelled.
    again = _json(cli("cancel", first, second, "--json"))
    assert again["cancelled"] == []
    assert again["not_cancellable"] == [
        {"id": first, "status": "failed"},
        {"id": second, "status": "done"},
    ]
    assert "not cancellable" in cli("cancel", second).output


def test_cancel_by_model_and_a_running_job_is_fenced_out(app, cli, tmp_path, digits_models):
    standard = _submit(app, tmp_path, digits_models["standard"], 2)
    (tmp_path / "r").mkdir()
    robust = _submit(app, tmp_path / "r", digits_models["robust"], 2)
    claim = lifecycle.claim(app.engine, robust[0], "scheduler-a", lease_seconds=60)
    assert claim is not None

    report = _json(cli("cancel", "--model", "robust", "--json"))
    assert report["cancelled"] == robust
    assert {status(_job(app, j)) for j in robust} == {"failed"}
    # The scheduler that held the running job can no longer renew it or store a result.
    assert not lifecycle.renew(app.engine, robust[0], "scheduler-a", claim.attempt, 60)
    assert set(entries_per_job(app.queue)) == set(standard)
    assert "cancelled 2 jobs" in cli("cancel", "--model", "standard").output
    assert not entries_per_job(app.queue)


def test_rerun_a_failed_job_enqueues_it_once(app, cli, tmp_path, digits_models):
    job_id, other = _submit(app, tmp_path, digits_models["standard"], 2)
    cli("cancel", job_id)
    with app.engine.begin() as conn:  # as if it had used up retries before
        conn.execute(sa.update(Job).where(Job.id == job_id).values(failures=2))
    report = _json(cli("rerun", job_id, "--json"))
    assert [r["id"] for r in report["rerun"]] == [job_id] and report["rerun"][0]["entry"]
    job = _job(app, job_id)
    assert (status(job), job["failures"], job["error"]) == ("queued", 0, None)
    assert entries_per_job(app.queue) == {job_id: 1, other: 1}

    assert _drain(app).done == 2
    assert status(_job(app, job_id)) == "done"
    # Rerunning what is done needs --force, refused before anything changes.
    _one_error(cli("rerun", job_id), "--force")
    assert status(_job(app, job_id)) == "done" and not entries_per_job(app.queue)
    forced = _json(cli("rerun", job_id, "--force", "--json"))
    assert [r["id"] for r in forced["rerun"]] == [job_id]
    assert entries_per_job(app.queue) == {job_id: 1}
    assert _drain(app).done == 1


def test_rerun_dead_moves_a_dead_letter_back(app, cli, tmp_path, digits_models):
    dead, other = _submit(app, tmp_path, digits_models["standard"], 2)
    # Dead-letter it as a scheduler does: fail the row, then bury its entry.
    (entry,) = app.queue.read("op-test", count=1)  # the first entry: the first job's
    assert entry.job_id == dead
    lifecycle.fail_dead_lettered(app.engine, dead, "delivered too often")
    app.queue.dead_letter(entry, "delivered too often")
    assert [x["job_id"] for x in app.queue.dead_letters()] == [dead]

    report = _json(cli("rerun", "--dead", "--json"))
    assert [r["id"] for r in report["rerun"]] == [dead]
    assert report["dead_letters_removed"] == 1
    assert app.queue.dead_letters() == []
    assert entries_per_job(app.queue)[dead] == 1
    _drain(app)
    assert status(_job(app, dead)) == "done" and status(_job(app, other)) == "done"


def test_queue_reports_a_constructed_state_and_repair_fixes_it(app, cli, tmp_path, digits_models):
    ids = _submit(app, tmp_path, digits_models["standard"], 5)
    dead, stranded, queued = ids[0], ids[1], ids[2:]
    # One dead letter, as the dispatcher leaves it.
    delivered = {e.job_id: e for e in app.queue.read("op-test", count=1)}
    lifecycle.fail_dead_lettered(app.engine, dead, "gave up after 3 failures: boom")
    app.queue.dead_letter(delivered[dead], "gave up after 3 failures: boom")
    # One stranded: SQL says queued, its entry is gone.
    app.queue.client.xdel(app.queue.stream, _job(app, stranded)["stream_id"])
    # One entry handed out and not acknowledged.
    (pending,) = app.queue.read("op-test", count=1)

    state = _json(cli("queue", "--json"))
    assert state["length"] == 3 and state["pending"] == 1
    assert state["pending_by_consumer"] == {"op-test": 1}
    assert state["jobs"] == {"queued": 4, "running": 0, "done": 0, "failed": 1}
    (letter,) = state["dead_letters"]
    assert letter["job_id"] == dead and "boom" in letter["reason"] and letter["age_seconds"] >= 0
    assert [s["id"] for s in state["stranded"]] == [stranded]
    assert "gone from the stream" in state["stranded"][0]["reason"]
    assert state["oldest_queued"]["id"] == stranded  # its row's entry id is the oldest
    text = cli("queue")
    assert text.exit_code == 0 and "boom" in text.output and "stranded" in text.output

    repaired = _json(cli("queue", "repair", "--json"))
    assert repaired["enqueued"] == [stranded] and repaired["repaired"] == 1
    assert _json(cli("queue", "--json"))["stranded"] == []
    assert entries_per_job(app.queue) == {job_id: 1 for job_id in [stranded, *queued]}
    assert "repaired 0 jobs" in cli("queue", "repair").output
    # The group's own --json reaches its subcommand too.
    assert _json(cli("queue", "--json", "repair"))["repaired"] == 0
    assert pending.job_id in queued


def test_job_shows_metrics_and_live_progress(app, cli, tmp_path, digits_models):
    finished, running = _submit(app, tmp_path, digits_models["standard"], 2)
    cli("cancel", running)
    _drain(app)
    job = _json(cli("job", finished, "--json"))
    assert job["status"] == "done" and job["attempts"] == 1 and job["progress"] is None
    names = {m["name"] for m in job["metrics"]}
    assert {"clean_accuracy", "robust_accuracy"} <= names
    assert job["spec"]["attack"] == "fgsm" and job["subtasks"] == []
    assert "robust_accuracy" in cli("job", finished).output

    cli("rerun", running)
    assert lifecycle.claim(app.engine, running, "scheduler-a", lease_seconds=60) is not None
    # Published as a worker does: the key the dispatcher hands it, through its reporter.
    report = _progress_reporter(
        redis_conn.worker_url(app.settings), progress_key(app.settings.redis_prefix, running)
    )
    report(5, 20)
    progress = _json(cli("job", running, "--json"))["progress"]
    assert (progress["done"], progress["total"], progress["fraction"]) == (5, 20, 0.25)
    assert progress["elapsed_seconds"] >= 0 and progress["eta_seconds"] >= 0
    text = cli("job", running).output
    assert "5 of 20 points" in text and "scheduler-a" in text


def test_jobs_watch_ends_when_the_queue_is_empty(app, cli, tmp_path, stack, digits_models):
    ids = _submit(app, tmp_path, digits_models["standard"], 3)
    worker = make_app(tmp_path / "home", **stack)  # the scheduler's own connections
    errors = []

    def drain():
        try:
            _drain(worker)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        rows = _json(cli("jobs", "--watch", "--interval", "0.2", "--json"))
    finally:
        thread.join(timeout=120)
    assert not errors and sorted(r["id"] for r in rows) == ids
    assert {r["status"] for r in rows} == {"done"}
    table = cli("jobs", "--watch", "--interval", "0.2")
    assert table.exit_code == 0 and "no job left to wait for" in table.output


def test_bad_input_is_one_error_line(app, cli, tmp_path, digits_models):
    _submit(app, tmp_path, digits_models["standard"], 1)
    _one_error(cli("job", 999), "no job 999")
    _one_error(cli("job", "abc"), "abc")
    _one_error(cli("cancel", 999), "no job 999")
    _one_error(cli("cancel", "x1"), "x1")
    _one_error(cli("rerun", 999, "--force"), "no job 999")
    _one_error(cli("cancel", "--model", "nope"), "nope")
    _one_error(cli("cancel"), "--model")
    _one_error(cli("rerun"), "--failed")
    _one_error(cli("queue", "--bogus"), "--bogus")
