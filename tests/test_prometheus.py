"""The scheduler's Prometheus metrics, scraped over HTTP and read with the reference parser."""

from __future__ import annotations

import urllib.request

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.prometheus import start_metrics_server
from tests.queue_helpers import free_port
from tests.service_helpers import make_app, submit_digits

SUITE = """n: 10
eps: {linf: {default: 0.2}}
evaluations:
  - attack: clean
  - {attack: fgsm, norm: linf}
  - {attack: pgd, norm: linf, params: {steps: 3}}
"""


def _scrape(port: int) -> dict:
    """(name, labels) -> value for every sample the endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_report_jobs_queue_durations_and_gpu_seconds(tmp_path, digits_models):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=str(suite), name="m")
    port = free_port()
    server, thread = start_metrics_server(app, port, addr="127.0.0.1")
    try:
        before = _scrape(port)
        assert before[("gauntlet_jobs", (("kind", "eval"), ("status", "queued")))] == 3
        assert before[("gauntlet_queue_length", ())] == 3
        assert before[("gauntlet_queue_pending", ())] == 0
        assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0
        # This machine has no GPU to run on: one finished job is marked as having asked
        # for two, which is all the GPU-seconds count reads.
        jobs = lifecycle.list_jobs(app.engine, limit=None)
        with app.engine.begin() as conn:
            spec = conn.scalar(sa.select(Job.spec).where(Job.id == jobs[0]["id"]))
            spec = {**spec, "resources": {"num_gpus": 2}}
            conn.execute(sa.update(Job).where(Job.id == jobs[0]["id"]).values(spec=spec))
        after = _scrape(port)
    finally:
        server.shutdown()
        thread.join(5)
    jobs = lifecycle.list_jobs(app.engine, limit=None)
    seconds = [j["seconds"] for j in jobs]
    assert after[("gauntlet_jobs", (("kind", "eval"), ("status", "done")))] == 3
    assert ("gauntlet_jobs", (("kind", "eval"), ("status", "queued"))) not in after
    assert after[("gauntlet_queue_length", ())] == 0  # acked entries are deleted
    assert after[("gauntlet_queue_dead_letters", ())] == 0
    kind = (("kind", "eval"),)
    assert after[("gauntlet_job_duration_seconds_count", kind)] == 3
    assert after[("gauntlet_job_duration_seconds_sum", kind)] == pytest.approx(sum(seconds))
    inf = (("kind", "eval"), ("le", "+Inf"))
    assert after[("gauntlet_job_duration_seconds_bucket", inf)] == 3
    small = (("kind", "eval"), ("le", "0.1"))
    assert after[("gauntlet_job_duration_seconds_bucket", small)] == sum(s <= 0.1 for s in seconds)
    assert after[("gauntlet_gpu_seconds_total", kind)] == pytest.approx(2 * jobs[0]["seconds"])
    assert after[("gauntlet_scrape_errors", (("service", "redis"),))] == 0


def test_an_unreachable_redis_is_reported_not_raised(tmp_path):
    app = make_app(tmp_path / "home", GAUNTLET_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    port = free_port()
    server, thread = start_metrics_server(app, port, addr="127.0.0.1")
    try:
        samples = _scrape(port)
    finally:
        server.shutdown()
        thread.join(5)
    assert samples[("gauntlet_scrape_errors", (("service", "redis"),))] == 1
    assert samples[("gauntlet_scrape_errors", (("service", "database"),))] == 0
    assert ("gauntlet_queue_length", ()) not in samples


def test_a_taken_port_is_one_clear_error(tmp_path):
    app = make_app(tmp_path / "home")
    port = free_port()
    server, thread = start_metrics_server(app, port, addr="127.0.0.1")
    try:
        with pytest.raises(GauntletError, match=f"cannot serve metrics on port {port}"):
            start_metrics_server(app, port, addr="127.0.0.1")
    finally:
        server.shutdown()
        thread.join(5)
