"""Commands that operate the service: scheduler, nightly, demo, db upgrade, data download."""

from __future__ import annotations

import signal
from dataclasses import asdict

import click

from gauntlet.scheduler.cli import _app, _print_json, console, main, say


@main.command()
@click.option("--drain", is_flag=True, help="Exit once the queue is empty.")
@click.option("--max-in-flight", type=int, help="Ray tasks to keep running (default 4).")
@click.option("--local", is_flag=True, help="Run jobs in this process instead of on Ray.")
@click.option("--num-cpus", type=int, help="CPUs of the local Ray (default: all).")
@click.option("--num-gpus", type=float, help="GPUs of the local Ray (default: detected).")
@click.pass_context
def scheduler(ctx, **options):
    """Run queued jobs on Ray and write their results (a daemon unless --drain)."""
    from gauntlet.scheduler.run import run_scheduler

    stop = {"flag": False}

    def request_stop(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, request_stop)
    # ``options``: drain, max_in_flight, local, num_cpus and num_gpus, as run_scheduler's.
    stats = run_scheduler(_app(ctx), **options, console=console, should_stop=lambda: stop["flag"])
    console.print(
        f"done {stats.done}, failed {stats.failed}, retried {stats.retried}, "
        f"dead-lettered {stats.dead}, timed out {stats.timed_out}, "
        f"cancelled {stats.cancelled}, outages {stats.outages}"
    )


@main.command()
@click.option("--suite", "suites", multiple=True, help="Also expand this suite for every model.")
@click.option(
    "--fast",
    is_flag=True,
    help="autoattack-fast for models whose autoattack results are current, the full "
    "autoattack for new or stale ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def nightly(ctx, suites, fast, as_json):
    """Enqueue every model x suite evaluation that has no result yet."""
    from gauntlet.scheduler.nightly import nightly as run_nightly

    app = _app(ctx)
    report = run_nightly(
        app.engine,
        app.queue,
        app.redis,
        prefix=app.settings.redis_prefix,
        suites=list(suites),
        fast=fast,
    )
    if as_json:
        _print_json(asdict(report))
    else:
        console.print(
            f"{report.models} models, {report.expanded} evaluations, "
            f"{report.new_jobs} new jobs ({report.stale} re-running stale results), "
            f"{report.enqueued} enqueued"
        )


@main.command()
@click.option("--num-cpus", type=int, help="CPUs of the local Ray (default: all).")
@click.pass_context
def demo(ctx, num_cpus):
    """Train two digits models, submit them, evaluate on local Ray, show the leaderboard."""
    from gauntlet.scheduler.demo import run_demo

    run_demo(_app(ctx), console=console, num_cpus=num_cpus)


@main.group()
def db():
    """Database maintenance."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx):
    """Migrate the database to the newest schema."""
    from gauntlet.db.session import current_revision, make_engine, upgrade

    app = _app(ctx)
    app.settings.ensure_home()
    engine = make_engine(app.settings.db_url)
    upgrade(engine)
    console.print(f"database at revision {current_revision(engine)}")


@main.group()
def data():
    """Datasets under GAUNTLET_DATA_ROOT."""


@data.command("download")
@click.argument("name")
@click.pass_context
def data_download(ctx, name):
    """Fetch a torchvision dataset into the data root (the only command that downloads)."""
    from gauntlet.workers.datasets import download

    app = _app(ctx)
    app.settings.ensure_home()
    download(name, app.settings.data_root)
    say(f"{name} is under {app.settings.data_root}")
