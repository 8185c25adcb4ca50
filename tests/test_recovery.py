"""Failures and recovery: a killed scheduler, transient failures, the dead-letter stream."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import sqlalchemy as sa

from gauntlet.db.schema import MetricRow
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from tests.outage_helpers import start_scheduler
from tests.service_helpers import make_app, submit_digits


def _suite(tmp_path: Path, attack: str, n: int = 20) -> str:
    path = tmp_path / f"{attack}.yaml"
    path.write_text(f"n: {n}\nevaluations:\n  - attack: {attack}\n")
    return str(path)


def _status(row) -> str:
    return str(getattr(row["status"], "value", row["status"]))


def test_killed_scheduler_job_is_reclaimed_and_finished_once(tmp_path, digits_models):
    """SIGKILL a real scheduler process mid-job; another one finishes the job, once."""
    app = make_app(tmp_path / "home", GAUNTLET_LEASE_SECONDS=2)
    slow = tmp_path / "slow.yaml"
    slow.write_text(
        "n: 450\neps: {linf: {default: 0.1}}\nevaluations:\n"
        "  - attack: pgd\n    norm: linf\n    params: {steps: 100, rel_stepsize: 0.01}\n"
    )
    submit_digits(
        app,
        digits_models["robust"],
        suite=str(slow),
    )
    (job,) = lifecycle.list_jobs(app.engine)

    proc = start_scheduler(app.settings.home, {"GAUNTLET_LEASE_SECONDS": "2"})
    try:
        deadline = time.monotonic() + 60
        while _status(lifecycle.get_job(app.engine, job["id"])) != "running":
            assert proc.poll() is None, (app.settings.home / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "the scheduler never claimed the job"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()

    claimed = lifecycle.get_job(app.engine, job["id"])
    assert claimed["attempts"] == 1 and claimed["lease_owner"]
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    final = lifecycle.get_job(app.engine, job["id"])
    assert _status(final) == "done" and final["attempts"] == 2
    assert final["lease_owner"] != claimed["lease_owner"]
    assert stats.done == 1
    with app.engine.connect() as conn:
        names = conn.execute(sa.select(MetricRow.name).where(MetricRow.job_id == job["id"]))
        names = [r[0] for r in names]
    assert len(names) == len(set(names)) > 0  # one set of metrics: finished once
    assert app.queue.is_empty()
