"""A scheduler rides through outages: Redis killed and restarted, the database cut off.

Each test runs a real ``gauntlet scheduler --local`` process against a Redis server of
its own and the machine's PostgreSQL (through a proxy the test can cut), breaks one of
them in the middle of the run, brings it back, and checks that the process kept running
and every job ended done exactly once: one set of metrics each, no retry spent, an
empty stream. The scheduler says once that the service went away and once that it came
back.
"""

from __future__ import annotations

import time

from gauntlet.db.session import upgrade
from gauntlet.scheduler import lifecycle
from tests.outage_helpers import (
    RedisServer,
    TcpProxy,
    start_scheduler,
    stop_scheduler,
    wait_until,
)
from tests.queue_helpers import fgsm_suite, metric_sets, own_redis, statuses
from tests.service_helpers import make_app, submit_digits

JOBS = 30
LEASE = "2"


def _done(app) -> int:
    return statuses(app.engine)["done"]


def _assert_all_done_once(app) -> None:
    jobs = lifecycle.list_jobs(app.engine, limit=None)
    assert statuses(app.engine) == {"done": JOBS}
    assert all(j["failures"] == 0 for j in jobs)
    names = metric_sets(app.engine)
    assert all(len(names[j["id"]]) == len(set(names[j["id"]])) > 0 for j in jobs)
    assert app.queue.dead_letters() == []


def _one_outage(log: str, service: str) -> None:
    assert "Traceback" not in log, log
    assert log.count(f"{service} is unreachable") == 1, log
    assert log.count(f"{service} is reachable again after an outage of") == 1, log


def _redis_run(tmp_path, digits_models, postgres_url, *, empty: bool):
    upgrade(postgres_url)
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    env = {"GAUNTLET_DB_URL": postgres_url, "GAUNTLET_REDIS_URL": server.url}
    app = make_app(tmp_path / "home", **env, GAUNTLET_LEASE_SECONDS=LEASE)
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, JOBS))
    args = ("--drain",) if empty else ()
    proc = start_scheduler(app.settings.home, {**env, "GAUNTLET_LEASE_SECONDS": LEASE}, *args)
    try:
        wait_until(lambda: _done(app) >= 3, 60, "the first jobs", proc)
        server.kill()
        time.sleep(3)
        assert proc.poll() is None, "the scheduler exited while Redis was away"
        server.start(empty=empty)
        app.queue.client.connection_pool.disconnect()  # the test's own client reconnects
        if empty:
            # --drain: it must not stop before every job is done, with no manual repair.
            proc.wait(timeout=60)
            assert proc.returncode == 0
        else:
            wait_until(lambda: _done(app) == JOBS, 60, "every job", proc)
            wait_until(app.queue.is_empty, 10, "the stream to empty", proc)
            assert proc.poll() is None, "the daemon stopped"
        log = stop_scheduler(proc, app.settings.home)
        _assert_all_done_once(app)
        assert app.queue.is_empty()
    finally:
        stop_scheduler(proc, app.settings.home)
        server.kill()
    _one_outage(log, "Redis")


def test_redis_killed_and_restarted_from_its_file(tmp_path, digits_models, postgres_url):
    _redis_run(tmp_path, digits_models, postgres_url, empty=False)


def test_redis_restarted_empty_is_repaired_by_the_scheduler(tmp_path, digits_models, postgres_url):
    # The restarted Redis knows none of the old entries: the drain ends only because the
    # scheduler's own repair gave every unfinished job a new entry.
    _redis_run(tmp_path, digits_models, postgres_url, empty=True)


def test_database_cut_off_mid_run(tmp_path, digits_models, postgres_url, own_redis):
    upgrade(postgres_url)
    proxy = TcpProxy(("127.0.0.1", 5432))
    assert "@127.0.0.1:5432/" in postgres_url
    proxied = postgres_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    app = make_app(
        tmp_path / "home",
        GAUNTLET_DB_URL=postgres_url,
        GAUNTLET_REDIS_URL=own_redis,
        GAUNTLET_LEASE_SECONDS=LEASE,
    )
    submit_digits(app, digits_models["standard"], suite=fgsm_suite(tmp_path, JOBS))
    env = {
        "GAUNTLET_DB_URL": proxied,
        "GAUNTLET_REDIS_URL": own_redis,
        "GAUNTLET_LEASE_SECONDS": LEASE,
    }
    proc = start_scheduler(app.settings.home, env)
    try:
        wait_until(lambda: _done(app) >= 3, 60, "the first jobs", proc)
        proxy.cut()
        cut_at = _done(app)
        time.sleep(4)
        assert proc.poll() is None, "the scheduler exited while the database was away"
        assert _done(app) == cut_at  # nothing could be written meanwhile
        proxy.restore()
        wait_until(lambda: _done(app) == JOBS, 60, "every job", proc)
        wait_until(app.queue.is_empty, 10, "the stream to empty", proc)
        assert proc.poll() is None, "the daemon stopped"
    finally:
        log = stop_scheduler(proc, app.settings.home)
        proxy.close()
    _assert_all_done_once(app)
    _one_outage(log, "the database")


__all__ = ["own_redis"]  # the fixture, imported for pytest
