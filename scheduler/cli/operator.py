"""Commands an operator runs on the queue: cancel, rerun, queue (and queue repair), job,
and the refreshing ``jobs --watch``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click
from rich.console import Group
from rich.live import Live

from gauntlet.scheduler.cli import (
    _app,
    _print_json,
    console,
    main,
    say,
    services,
    show_table,
    tables,
)
from gauntlet.scheduler.cli.tables import _row, _table, _text
from gauntlet.scheduler.cli.verify import provenance_table


def _ids(ids) -> str:
    return ", ".join(str(i) for i in ids)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(round(value))
    hours, rest = divmod(value, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


@main.command()
@click.argument("job_ids", nargs=-1, type=int, metavar="[JOB]...")
@click.option("--model", help="Cancel every queued and running job of this model (name or id).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def cancel(ctx, job_ids, model, as_json):
    """Fail queued or running jobs with "cancelled by the operator"; nothing runs them."""

    report = services(ctx).cancel_jobs(job_ids, model=model)
    if as_json:
        _print_json(asdict(report))
        return
    if report.cancelled:
        say(f"cancelled {len(report.cancelled)} jobs: {_ids(report.cancelled)}")
    elif not report.not_cancellable:
        say("no queued or running job to cancel")
    for job in report.not_cancellable:
        say(f"job {job['id']} is {job['status']}: not cancellable")


@main.command()
@click.argument("job_ids", nargs=-1, type=int, metavar="[JOB]...")
@click.option("--failed", is_flag=True, help="Rerun every failed job.")
@click.option("--dead", is_flag=True, help="Rerun every job in the dead-letter stream.")
@click.option("--force", is_flag=True, help="Also rerun done jobs (recomputes their results).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def rerun(ctx, job_ids, failed, dead, force, as_json):
    """Queue finished jobs again, each with its retries whole and one stream entry."""

    report = services(ctx).rerun_jobs(job_ids, failed=failed, dead=dead, force=force)
    if as_json:
        _print_json(asdict(report))
        return
    ids = [r["id"] for r in report.rerun]
    say(f"queued {len(ids)} jobs again: {_ids(ids)}" if ids else "no job to rerun")
    if report.dead_letters_removed:
        say(f"removed {report.dead_letters_removed} dead letters")
    for job in report.not_rerun:
        say(f"job {job['id']} is {job['status']} already: not rerun")
    for letter in report.dead_letters_skipped:
        say(f"dead letter {letter['dead_id']} names no job ({letter.get('job_id')!r}): left")


def _queue_tables(state: dict) -> list:
    jobs = state["jobs"]
    oldest = state["oldest_queued"]
    summary = _table(f"queue {state['stream']}")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    consumers = state["pending_by_consumer"]
    lines = [
        ("stream entries", state["length"]),
        ("pending (delivered, not acknowledged)", state["pending"]),
        *((f"  pending on {name}", count) for name, count in sorted(consumers.items())),
        ("dead letters", len(state["dead_letters"])),
        ("stranded jobs", len(state["stranded"])),
        *((f"jobs {status}", count) for status, count in jobs.items()),
        (
            "oldest queued job",
            "-" if oldest is None else f"{oldest['id']} ({_seconds(oldest['age_seconds'])})",
        ),
    ]
    for line in lines:
        _row(summary, line)
    out = [summary]
    if state["dead_letters"]:
        dead = _table("dead letters")
        for column in ("job", "deliveries", "age", "reason"):
            dead.add_column(column)
        for x in state["dead_letters"]:
            cells = [x.get("job_id", ""), x.get("deliveries", ""), _seconds(x["age_seconds"])]
            _row(dead, [*cells, x.get("reason", "")])
        out.append(dead)
    if state["stranded"]:
        stranded = _table("stranded (`gauntlet queue repair` gives each an entry)")
        for column in ("job", "status", "attempts", "reason"):
            stranded.add_column(column)
        for s in state["stranded"]:
            _row(stranded, [s["id"], s["status"], s["attempts"], s["reason"]])
        out.append(stranded)
    return out


@main.group("queue", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_group(ctx, as_json):
    """The queue: stream, pending entries, dead letters, the oldest wait, stranded jobs."""
    if ctx.invoked_subcommand is not None:
        return  # ``queue --json repair`` hands the flag on through ctx.params
    from gauntlet.scheduler import service

    state = service.queue_state(_app(ctx))
    if as_json:
        _print_json(state)
        return
    for table in _queue_tables(state):
        show_table(table)


@queue_group.command("repair")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_repair(ctx, as_json):
    """Give every stranded job one stream entry, as the schedulers do once per lease."""
    from gauntlet.scheduler import service

    report = service.repair_queue(_app(ctx))
    if as_json or ctx.parent.params.get("as_json"):
        _print_json({**asdict(report), "repaired": report.repaired})
        return
    say(
        f"repaired {report.repaired} jobs: {len(report.enqueued)} enqueued"
        + (f" ({_ids(report.enqueued)})" if report.enqueued else "")
        + f", {len(report.adopted)} given the entry they had"
        + (f" ({_ids(report.adopted)})" if report.adopted else "")
    )
    if report.raced:
        say(f"{len(report.raced)} were fixed by someone else meanwhile: {_ids(report.raced)}")


_FIELDS = (
    ("model", "model"),
    ("kind", "kind"),
    ("dataset", "dataset"),
    ("attack", "attack"),
    ("defense", "defense"),
    ("suite", "suite"),
    ("status", "status"),
    ("attempts", "attempts"),
    ("failures", "failures"),
    ("owner", "lease_owner"),
    ("lease expires", "lease_expires_at"),
    ("stream entry", "stream_id"),
    ("error", "error"),
    ("created", "created_at"),
    ("started", "started_at"),
    ("finished", "finished_at"),
    ("worker", "worker_host"),
    ("device", "device"),
    ("seconds", "seconds"),
)


def _job_tables(job: dict) -> list:
    overview = _table(f"job {job['id']}")
    overview.add_column("field")
    overview.add_column("value", overflow="fold")  # ids and the spec are long words
    threat = "-" if job.get("norm") is None else f"{job['norm']} {job['eps']:.4g}"
    _row(overview, ["threat", threat])
    for label, key in _FIELDS:
        value = job.get(key)
        _row(overview, [label, "-" if value is None or value == "" else value])
    progress = job["progress"]
    if progress is not None:
        share = "" if progress["fraction"] is None else f" ({100 * progress['fraction']:.0f}%)"
        _row(overview, ["progress", f"{progress['done']} of {progress['total']} points{share}"])
        _row(overview, ["elapsed", _seconds(progress["elapsed_seconds"])])
        _row(overview, ["time left (estimate)", _seconds(progress["eta_seconds"])])
    _row(overview, ["spec", json.dumps(job["spec"], sort_keys=True, default=str)])
    out = [overview]
    if job["metrics"]:
        metrics = _table("metrics", "95% Wilson interval")
        for column in ("name", "value", "n", "95% CI"):
            metrics.add_column(column, justify="left" if column == "name" else "right")
        for m in job["metrics"]:
            ci = "-" if m["ci_low"] is None else f"{m['ci_low']:.4f}-{m['ci_high']:.4f}"
            _row(metrics, [m["name"], f"{m['value']:.4f}", m["n"], ci])
        out.append(metrics)
    if job["subtasks"]:
        out.append(tables.subtasks_table(job["subtasks"]))
    record = (job.get("details") or {}).get("provenance")
    if record:
        out.append(provenance_table(record))
    # Kinds that store files (explanation maps and grids) name them here, by hash.
    artifacts = (job.get("details") or {}).get("artifacts") or {}
    if artifacts:
        listing = _table("artifacts")
        listing.add_column("name")
        listing.add_column("sha256", overflow="fold")
        for name, sha in sorted(artifacts.items()):
            _row(listing, [name, sha])
        out.append(listing)
    return out


@main.command("job")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def job_cmd(ctx, job_id, as_json):
    """One job: spec, status, attempts, error, times, metrics, sub-tasks, live progress."""

    job = services(ctx).job_detail(job_id)
    if as_json:
        _print_json(job)
        return
    for table in _job_tables(job):
        show_table(table)


def watch_jobs(ctx, filters: dict, interval: float, as_json: bool) -> None:
    """``gauntlet jobs --watch``: refresh until no job (of the filters) is queued or running.

    It ends as soon as the count reaches zero, so a drained queue ends it at the first
    look; with JSON only the final listing is printed, as one document.
    """
    backend = services(ctx)
    scope = {"model": filters.get("model"), "dataset": filters.get("dataset")}

    def look() -> tuple[list[dict], int]:
        return backend.list_jobs(**filters), backend.active_jobs(**scope)

    def view(rows: list[dict], active: int) -> Group:
        note = f"{active} queued or running; refreshing every {interval:g}s"
        return Group(tables.jobs_table(rows), _text(note if active else "no job left to wait for"))

    rows, active = look()
    if as_json:
        while active:
            time.sleep(interval)
            rows, active = look()
        _print_json(rows)
        return
    with Live(view(rows, active), console=console, auto_refresh=False) as live:
        while active:
            time.sleep(interval)
            rows, active = look()
            live.update(view(rows, active), refresh=True)
