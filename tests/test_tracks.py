"""The backdoor and privacy track through the service: jobs, sub-tasks, tables, CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.boards.tracks import track_table
from gauntlet.scheduler.cli import main
from gauntlet.scheduler.executors import LocalExecutor, RayExecutor
from gauntlet.scheduler.train import request_job
from tests.service_helpers import make_app, start_local_ray, submit_digits

PATE = {"teachers": 4, "backdoored_teachers": 1, "epochs": 25, "student_epochs": 25}


@pytest.fixture(scope="module")
def ray_warm():
    """A local Ray whose worker processes have already imported the teacher code.

    A teacher trains for about a second; a cold worker process takes longer than that
    to start and import torch on a busy machine, so on a cold pool the teachers could
    run one after another by accident. Four CPUs keep four warm workers alive.
    """
    ray = start_local_ray(4, 1)

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self):
            self.arrived = 0

        def arrive(self) -> int:
            self.arrived += 1
            return self.arrived

        def count(self) -> int:
            return self.arrived

    @ray.remote(num_cpus=1)
    def warm(barrier) -> int:
        import os
        import time

        import gauntlet.workers.jobs.pate  # noqa: F401 - the import is the warming

        ray.get(barrier.arrive.remote())
        while ray.get(barrier.count.remote()) < 4:  # hold the worker until all four are up
            time.sleep(0.05)
        return os.getpid()

    barrier = Barrier.remote()
    assert len(set(ray.get([warm.remote(barrier) for _ in range(4)]))) == 4
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_pate_teachers_run_as_parallel_ray_tasks(tmp_path, digits_models, ray_warm, stack):
    app = make_app(tmp_path / "home", **stack)
    submit_digits(app, digits_models["standard"], name="base", suite=_clean_suite(tmp_path))
    params = {**PATE, "teacher_gpus": 0.25}
    job_id, new = request_job(app.engine, app.queue, "base", "pate", "gnmax", params, n=150)
    assert new
    stats = app.dispatcher(RayExecutor(), max_in_flight=1).run(drain=True)
    assert stats.failed == 0, [j.get("error") for j in lifecycle.list_jobs(app.engine)]
    records = lifecycle.list_subtasks(app.engine, job_id)
    assert sorted(r["name"] for r in records) == [f"teacher-{t}" for t in range(4)]
    # Progress counted teachers as they finished, then the student.
    progress = app.redis.hgetall(f"{app.settings.redis_prefix}:progress:{job_id}")
    assert progress == {"done": "5", "total": "5"}
    # Each teacher held a quarter of the one logical GPU, in its own worker process.
    assert all(r["gpu_ids"] == ["0"] for r in records)
    assert len({r["worker_pid"] for r in records}) >= 2
    # Parallel, not one after another: some two teachers overlap in time.
    overlaps = [
        (a["name"], b["name"])
        for a in records
        for b in records
        if a["name"] < b["name"]
        and a["started_at"] < b["finished_at"]
        and b["started_at"] < a["finished_at"]
    ]
    assert overlaps
    (row,) = track_table(app.engine, "pate")
    m = row.metrics
    # The planted teacher learned its backdoor; the vote of four did not pass it on.
    assert m["backdoored_teacher_attack_success_rate"] > 0.5
    assert m["aggregate_attack_success_rate"] < 0.2
    assert m["student_attack_success_rate"] < 0.2
    assert m["student_accuracy"] > 0.7
    assert m["eps"] <= m["eps_data_independent"] and m["delta"] == 1e-5


def _env(tmp_path) -> dict:
    """What the CLI needs to find the test app's database, queue and artifacts."""
    return {"GAUNTLET_HOME": str(tmp_path / "home")}


def _clean_suite(tmp_path) -> str:
    path = tmp_path / "clean.yaml"
    path.write_text("n: 50\nevaluations:\n  - attack: clean\n")
    return str(path)


def test_pate_without_noise_is_the_plurality_and_claims_no_privacy(tmp_path, digits_models):
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], name="base", suite=_clean_suite(tmp_path))
    params = {**PATE, "noise": False}
    request_job(app.engine, app.queue, "base", "pate", "lnmax", params, n=150)
    assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0
    (row,) = track_table(app.engine, "pate")
    assert "eps" not in row.metrics and row.metrics["answered"] == 1.0
    # Run by the local executor, the teachers still leave their records.
    (job,) = [j for j in lifecycle.list_jobs(app.engine) if j["kind"] == "pate"]
    records = lifecycle.list_subtasks(app.engine, job["id"])
    assert len(records) == 4 and all(r["finished_at"] >= r["started_at"] for r in records)
    result = CliRunner().invoke(main, ["privacy"], env=_env(tmp_path))
    assert result.exit_code == 0 and "privacy (PATE)" in result.output
    result = CliRunner().invoke(main, ["privacy", "--json"], env=_env(tmp_path))
    (listed,) = json.loads(result.output)
    assert listed["method"] == "lnmax" and listed["settings"]["noise"] is False
    assert listed["metrics"]["student_accuracy"] == row.metrics["student_accuracy"]
    result = CliRunner().invoke(main, ["subtasks", str(job["id"]), "--json"], env=_env(tmp_path))
    names = sorted(r["name"] for r in json.loads(result.output))
    assert names == [f"teacher-{t}" for t in range(4)]


def test_bad_track_settings_fail_at_request_time(tmp_path, digits_models):
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], name="base", suite=_clean_suite(tmp_path))
    env = _env(tmp_path)
    for args, message in (
        (["pate", "base", "--set", "gamma=-1"], "gamma"),
        (["pate", "base", "--set", "colour=red"], "Unknown PATE parameter"),
        (["backdoor", "base", "--set", "trigger=star"], "unknown trigger kind"),
        (["backdoor", "base", "--poison-rate", "1.5"], "poison_rate"),
        (["backdoor", "base", "--defense", "finetune", "--set", "amplify=3"], "amplify"),
    ):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 1 and message in result.output, result.output


def test_backdoor_suite_fills_the_backdoor_table(tmp_path, digits_models):
    suite = tmp_path / "backdoor.yaml"
    suite.write_text(
        "n: 300\nevaluations:\n"
        "  - {kind: backdoor, attack: none}\n"
        "  - {kind: backdoor, attack: transfer, params: {reference: false}}\n"
        "  - {kind: backdoor, attack: distillation, params: {reference: false}}\n"
        "  - {kind: backdoor, attack: distillation,"
        " params: {triggered_fraction: 0.2, reference: false}}\n"
        "  - {kind: backdoor, attack: finetune, params: {reference: false}}\n"
    )
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], name="base", suite=str(suite))
    assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0
    rows = {
        (r.method, r.settings.get("triggered_fraction", 0)): r.metrics
        for r in track_table(app.engine, "backdoor")
    }
    none = rows[("none", 0)]
    # BadNets at 10% poison: the backdoor works and costs little clean accuracy.
    assert none["attack_success_rate"] >= 0.95
    assert none["clean_accuracy"] >= none["clean_model_clean_accuracy"] - 0.02
    assert none["clean_model_attack_success_rate"] <= 0.1  # the trigger alone does little
    # Every defense starts from the same backdoored model (one seed, one recipe).
    assert {r["backdoored_attack_success_rate"] for r in rows.values()} == {
        none["attack_success_rate"]
    }
    baseline = none["clean_model_attack_success_rate"]
    transfer = rows[("transfer", 0)]["attack_success_rate"]
    assert baseline < transfer < none["attack_success_rate"]
    # Distillation on pristine data forgets the backdoor; on triggered data it does not.
    assert rows[("distillation", 0)]["attack_success_rate"] <= baseline + 0.15
    assert rows[("distillation", 0.2)]["attack_success_rate"] >= 0.85
    assert rows[("finetune", 0)]["attack_success_rate"] <= 0.3
    result = CliRunner().invoke(main, ["backdoors"], env=_env(tmp_path))
    assert result.exit_code == 0 and "backdoors" in result.output
