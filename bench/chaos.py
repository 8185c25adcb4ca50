"""Faults against a running scheduler: is every job done exactly once, and how fast?

Each fault gets a fresh home and a fresh queue of cheap jobs (FGSM on a digits CNN,
one job each), a real ``gauntlet scheduler --local`` process, and one kind of trouble:

- ``sigkill``: the scheduler SIGKILLed ten times mid-run, restarted each time;
- ``redis-flush``: the stream wiped (FLUSHALL) mid-run, as after a failover;
- ``redis-restart-aof``: Redis killed and restarted from its append-only file;
- ``redis-restart-empty``: Redis killed and restarted with nothing;
- ``db-cut``: every database connection cut for a few seconds (PostgreSQL through a
  small TCP proxy; skipped when no PostgreSQL answers);
- ``concurrent-submit``: four processes submitting the same model at once.

The first two and the last run on the embedded stack (SQLite and the embedded Redis);
the Redis restarts need a redis-server of their own, the cut needs a TCP database.
Per fault it prints jobs submitted, done, failed, duplicated (a result written twice,
or a job given a second stream entry while one was live), reclaimed (claimed again
after a fault: the price of one, not an error; a ``--local`` scheduler holds several
claimed jobs while it runs one) and the recovery time: from the fault until a job that
no scheduler had taken before it is done (for a scheduler kill, the longest of the ten).
Usage: ``python bench/chaos.py [--jobs 40] [--only NAME]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

import sqlalchemy as sa  # noqa: E402

from bench.chaos_parts import CutDatabase, postgres_url, train_weights  # noqa: E402
from gauntlet.db.schema import Job, MetricRow  # noqa: E402
from tests.outage_helpers import RedisServer  # noqa: E402
from tests.queue_helpers import fgsm_suite  # noqa: E402

SCHEDULER = [sys.executable, "-m", "gauntlet.scheduler.cli", "scheduler", "--local"]


class Run:
    """One fault's stack: settings in the environment, a scheduler process, counts."""

    def __init__(self, root: Path, name: str, weights: Path, jobs: int, env: dict[str, str]):
        self.home = root / name
        self.env = dict(os.environ, GAUNTLET_HOME=str(self.home), GAUNTLET_LEASE_SECONDS="1")
        # The queue's faults alone: no gate job ahead of the suite, no follow-ups after it.
        self.env.update(GAUNTLET_GATE="0", GAUNTLET_FOLLOWUPS="0")
        self.env.update(env)
        self.weights, self.jobs = weights, jobs
        self.suite = fgsm_suite(root, jobs)
        self.proc: subprocess.Popen | None = None
        self.entries_added = 0  # stream entries created, counted before any fault

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "gauntlet.scheduler.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"gauntlet {args[0]} failed: {done.stderr.strip() or done.stdout}")
        return done

    def submit_args(self) -> list[str]:
        model = ["--arch", "small-cnn", "--dataset", "digits"]
        return ["submit", str(self.weights), *model, "--suite", self.suite]

    def submit(self) -> None:
        self.cli(*self.submit_args())

    def start(self) -> None:
        self.proc = subprocess.Popen(
            SCHEDULER, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def engine(self) -> sa.Engine:
        url = self.env.get("GAUNTLET_DB_URL") or f"sqlite:///{self.home / 'gauntlet.db'}"
        return sa.create_engine(url)

    def counts(self) -> dict[str, int]:
        with self.engine().connect() as conn:
            rows = conn.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status))
            return {str(getattr(s, "value", s)): n for s, n in rows}

    def wait_done(self, at_least: int, timeout: float) -> float | None:
        """Seconds until ``at_least`` jobs are done; None past ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if self.counts().get("done", 0) >= at_least:
                    return time.monotonic() - start
            except sa.exc.OperationalError:
                pass  # the database itself may be the fault
            time.sleep(0.05)
        return None

    def queued_ids(self) -> set[int]:
        with self.engine().connect() as conn:
            return set(conn.execute(sa.select(Job.id).where(Job.status == "queued")).scalars())

    def wait_any_done(self, ids: set[int], timeout: float) -> float | None:
        """Seconds until one of ``ids`` is done: the queue moves again after a fault."""
        start = time.monotonic()
        query = sa.select(sa.func.count()).where(Job.id.in_(ids), Job.status == "done")
        while ids and time.monotonic() - start < timeout:
            try:
                with self.engine().connect() as conn:
                    if conn.execute(query).scalar_one():
                        return time.monotonic() - start
            except sa.exc.OperationalError:
                pass
            time.sleep(0.05)
        return None

    def report(self, recovery: float | None) -> dict[str, object]:
        with self.engine().connect() as conn:
            attempts = conn.execute(sa.select(Job.attempts)).scalars().all()
            per_job = conn.execute(
                sa.select(MetricRow.job_id, MetricRow.name, sa.func.count())
                .group_by(MetricRow.job_id, MetricRow.name)
                .having(sa.func.count() > 1)
            ).all()
        counts = self.counts()
        return {
            "submitted": sum(counts.values()),
            "done": counts.get("done", 0),
            "failed": counts.get("failed", 0),
            "duplicated": len({job for job, _name, _n in per_job}),
            "reclaimed": sum(1 for a in attempts if a > 1),
            "recovery_s": None if recovery is None else round(recovery, 2),
        }


def _mid_run(run: Run, fault: Callable[[], None], *, after: int = 5) -> dict[str, object]:
    """Submit, start, wait for ``after`` jobs, apply ``fault``, then time the recovery."""
    run.submit()
    run.start()
    try:
        run.wait_done(after, 120)
        waiting = run.queued_ids()  # jobs no scheduler had taken yet: only a healthy
        started = time.monotonic()  # queue finishes one of them
        fault()
        recovery = run.wait_any_done(waiting, 120)
        if recovery is not None:
            recovery = time.monotonic() - started
        run.wait_done(run.jobs, 300)
    finally:
        run.stop()
    return run.report(recovery)


def sigkill(run: Run) -> dict[str, object]:
    run.submit()
    recoveries = []
    run.start()
    for _ in range(10):
        run.wait_done(min(run.counts().get("done", 0) + 2, run.jobs), 120)
        run.kill()  # mid-job: the next one is already running
        waiting = run.queued_ids()
        run.start()  # a replacement, as an orchestrator would start one
        recovery = run.wait_any_done(waiting, 120)
        if recovery is not None:
            recoveries.append(recovery)
    try:
        run.wait_done(run.jobs, 300)
    finally:
        run.stop()
    return run.report(max(recoveries) if recoveries else None)


def redis_flush(run: Run) -> dict[str, object]:
    from gauntlet.cluster.settings import Settings
    from gauntlet.scheduler.app import App

    def flush():
        os.environ["GAUNTLET_HOME"] = str(run.home)
        app = App(Settings.from_env())
        before = app.queue.client.xlen(app.queue.stream)
        app.redis.flushall()
        after = app.queue.client.xlen(app.queue.stream)
        print(f"  (redis-flush: stream {before} -> {after} entries)", flush=True)

    return _mid_run(run, flush)


def redis_restart(run: Run, server: RedisServer) -> dict[str, object]:
    def restart():
        server.kill()
        time.sleep(3)
        server.start(empty=not server.appendonly)

    try:
        return _mid_run(run, restart)
    finally:
        server.kill()


def db_cut(run: Run, database: CutDatabase) -> dict[str, object]:
    try:
        return _mid_run(run, lambda: database.cut(seconds=3))
    finally:
        database.drop()


def concurrent_submit(run: Run) -> dict[str, object]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gauntlet.scheduler.cli", *run.submit_args()],
            env=run.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(4)
    ]
    for proc in procs:
        proc.wait(timeout=300)
    from gauntlet.cluster.settings import Settings
    from gauntlet.scheduler.app import App

    os.environ["GAUNTLET_HOME"] = str(run.home)
    queue = App(Settings.from_env()).queue
    entries = [int(f["job_id"]) for _id, f in queue.client.xrange(queue.stream)]
    twice = len(entries) - len(set(entries))
    run.start()
    try:
        run.wait_done(run.jobs, 300)
    finally:
        run.stop()
    report = run.report(None)  # nothing broke: there is nothing to recover from
    report["duplicated"] = int(report["duplicated"]) + twice
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--only", help="run one fault only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gauntlet-chaos-"))
    weights = train_weights(root)
    faults: dict[str, Callable[[Run], dict[str, object]]] = {
        "sigkill": sigkill,
        "redis-flush": redis_flush,
        "concurrent-submit": concurrent_submit,
    }
    extra: dict[str, dict[str, str]] = {}
    servers: dict[str, RedisServer] = {}
    if shutil.which("redis-server"):
        for name, aof in (("redis-restart-aof", True), ("redis-restart-empty", False)):
            servers[name] = RedisServer(root / name / "redis", appendonly=aof)
            extra[name] = {"GAUNTLET_REDIS_URL": servers[name].url}
            faults[name] = lambda run, n=name: redis_restart(run, servers[n])
    db = postgres_url()
    database = None
    if db is not None:
        database = CutDatabase(db)
        extra["db-cut"] = {"GAUNTLET_DB_URL": database.url}
        faults["db-cut"] = lambda run: db_cut(run, database)
    print(f"{'fault':<20} {'submitted':>9} {'done':>5} {'failed':>6} {'duplicated':>10} "
          f"{'reclaimed':>10} {'recovery_s':>10}")  # fmt: skip
    for name, fault in faults.items():
        if args.only and name != args.only:
            continue
        if name in servers:
            servers[name].start()
        if name == "db-cut":
            database.create()
        run = Run(root, name, weights, args.jobs, extra.get(name, {}))
        r = fault(run)
        print(f"{name:<20} {r['submitted']:>9} {r['done']:>5} {r['failed']:>6} "
              f"{r['duplicated']:>10} {r['reclaimed']:>10} {r['recovery_s']!s:>10}",
              flush=True)  # fmt: skip
    if db is None:
        print("db-cut: skipped (no PostgreSQL at GAUNTLET_BENCH_POSTGRES_URL)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
