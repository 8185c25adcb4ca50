"""Failures and recovery: a killed scheduler, transient failures, the dead-letter stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from gauntlet.db.schema import MetricRow
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.workers.attacks import register_attack
from gauntlet.workers.attacks.base import Attack, RunOutput
from tests.service_helpers import make_app, submit_digits


@register_attack
class FailingTwice(Attack):
    """A third-party attack whose worker dies on its first two tries (e.g. a lost node)."""

    name = "test-fails-twice"
    needs_threat = False
    tries: dict = {}

    def run(self, model, x, y, threat, generator):
        key = tuple(y.tolist())
        FailingTwice.tries[key] = FailingTwice.tries.get(key, 0) + 1
        if FailingTwice.tries[key] <= 2:
            raise RuntimeError("worker lost its node")
        return RunOutput(x_adv=x, fooled=x.new_zeros(len(x), dtype=bool))


def _suite(tmp_path: Path, attack: str, n: int = 20) -> str:
    path = tmp_path / f"{attack}.yaml"
    path.write_text(f"n: {n}\nevaluations:\n  - attack: {attack}\n")
    return str(path)


def _status(row) -> str:
    return str(getattr(row["status"], "value", row["status"]))


@pytest.mark.parametrize("max_deliveries, expected", [(3, "done"), (2, "failed")])
def test_transient_failures_retry_then_dead_letter(
    tmp_path, digits_models, max_deliveries, expected
):
    FailingTwice.tries.clear()
    app = make_app(
        tmp_path / "home", GAUNTLET_LEASE_SECONDS=0.3, GAUNTLET_MAX_DELIVERIES=max_deliveries
    )
    submit_digits(
        app,
        digits_models["standard"],
        suite=_suite(tmp_path, "test-fails-twice"),
    )
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    (row,) = lifecycle.list_jobs(app.engine)
    assert _status(row) == expected
    if expected == "done":
        # Two transient failures, each retried after the lease, then success.
        assert (stats.retried, stats.done, row["attempts"]) == (2, 1, 3)
    else:
        assert (stats.retried, stats.dead, row["attempts"]) == (1, 1, 2)
        assert "gave up after 2 failures: RuntimeError: worker lost its node" in row["error"]
        (dead,) = app.queue.dead_letters()
        assert int(dead["job_id"]) == row["id"]
    assert app.queue.is_empty()


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

    env = dict(os.environ, GAUNTLET_HOME=str(app.settings.home), GAUNTLET_LEASE_SECONDS="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gauntlet.scheduler.cli", "scheduler", "--local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while _status(lifecycle.get_job(app.engine, job["id"])) != "running":
            assert proc.poll() is None, proc.stderr.read().decode()
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
