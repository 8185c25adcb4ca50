"""The ``gauntlet`` command line: a thin click layer over the scheduler's functions.

Core code raises ``GauntletError``; this layer prints its message on one line and
exits with status 1, no traceback. Every option can also come from an environment
variable (``GAUNTLET_<COMMAND>_<OPTION>``), and every listing takes ``--json``.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict

import click
from rich.console import Console

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import render
from gauntlet.scheduler.app import App

console = Console()
err_console = Console(stderr=True)


class GauntletGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GauntletError as exc:
            err_console.print(f"[red]Error:[/red] {exc}", highlight=False, markup=True)
            sys.exit(1)


def _app(ctx: click.Context) -> App:
    return ctx.ensure_object(App)


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _show(rows: list, as_json: bool, what: str, tables) -> None:
    """A listing as JSON, a line saying there is nothing yet, or rich tables."""
    if as_json:
        _print_json([asdict(r) for r in rows])
    elif not rows:
        console.print(f"No finished {what} evaluations yet.")
    else:
        for table in tables(rows):
            console.print(table)


@click.group(
    cls=GauntletGroup,
    context_settings={"auto_envvar_prefix": "GAUNTLET", "help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="gauntlet-eval")
def main():
    """gauntlet: robustness evaluation and leaderboard for image classifiers."""


@main.command()
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--arch", required=True, help="Architecture name (see `gauntlet archs`).")
@click.option("--dataset", required=True, help="Dataset name (see `gauntlet datasets`).")
@click.option("--suite", default="quick", show_default=True, help="Evaluation suite.")
@click.option("--name", help="Display name (default: the file name).")
@click.option("--n", type=int, help="Evaluation points (default: the suite's).")
@click.option("--mean", help="Per-channel mean, comma separated (default: the dataset's).")
@click.option("--std", help="Per-channel std, comma separated (default: the dataset's).")
@click.option("--num-classes", type=int, help="Classes (default: the dataset's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def submit(ctx, weights, arch, dataset, suite, name, n, mean, std, num_classes, as_json):
    """Submit a safetensors model and enqueue its suite's evaluations."""
    from gauntlet.scheduler.submit import submit as do_submit

    app = _app(ctx)
    overrides = {
        "mean": _floats(mean, "mean"),
        "std": _floats(std, "std"),
        "num_classes": num_classes,
    }
    report = do_submit(
        app.settings,
        app.engine,
        app.queue,
        weights,
        arch=arch,
        dataset=dataset,
        suite=suite,
        name=name,
        n=n,
        input_overrides=overrides,
    )
    if as_json:
        _print_json(asdict(report))
        return
    state = "new model" if report.new_model else "known model"
    console.print(
        f"{report.name} ({state} {report.model_id[:12]}): {report.jobs} evaluations, "
        f"{report.new_jobs} new, {report.enqueued} enqueued"
    )


def _floats(text: str | None, what: str):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GauntletError(
            f"Expected `--{what}` to be numbers separated by commas, but got {text!r}"
        ) from None


@main.command()
@click.option("--status", type=click.Choice(["queued", "running", "done", "failed"]))
@click.option("--model", help="Model name or id prefix.")
@click.option("--dataset")
@click.option("--limit", type=int, default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def jobs(ctx, status, model, dataset, limit, as_json):
    """List jobs and their status."""
    from gauntlet.scheduler import lifecycle

    rows = lifecycle.list_jobs(
        _app(ctx).engine, status=status, model=model, dataset=dataset, limit=limit
    )
    if as_json:
        _print_json(rows)
    else:
        console.print(render.jobs_table(rows))


@main.command()
@click.option("--dataset")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def leaderboard(ctx, dataset, as_json):
    """Rank models by robust accuracy (per-example worst case across attacks)."""
    from gauntlet.scheduler.leaderboard import leaderboard as board

    entries = board(_app(ctx).engine, dataset=dataset)
    _show(entries, as_json, "robustness", render.leaderboard_tables)


@main.command()
@click.argument("model")
@click.option(
    "--method",
    required=True,
    type=click.Choice(["fgsm-at", "pgd-at", "ensemble-at", "distillation"]),
)
@click.option("--static", "static", multiple=True, help="ensemble-at: a pre-trained model.")
@click.option("--eps", type=float, help="Adversarial training budget (Linf).")
@click.option("--epochs", type=int)
@click.option("--temperature", type=float, help="Distillation temperature (default 100).")
@click.option("--suite", default="quick", show_default=True, help="Suite for the derived model.")
@click.option("--num-gpus", type=float, default=0.0, show_default=True)
@click.pass_context
def train(ctx, model, method, eps, epochs, temperature, suite, num_gpus, static):
    """Train a defended model from MODEL (a name or id prefix) as a job; it is then evaluated."""
    from gauntlet.scheduler.train import request_training

    params = {
        k: v
        for k, v in {
            "eps": eps,
            "epochs": epochs,
            "temperature": temperature,
            "suite": suite,
        }.items()
        if v is not None
    }
    app = _app(ctx)
    if static:
        from gauntlet.scheduler.train import find_model

        params["static_models"] = [find_model(app.engine, ref)["id"] for ref in static]
    job_id, new = request_training(app.engine, app.queue, model, method, params, num_gpus=num_gpus)
    console.print(f"train job {job_id} queued" if new else "this training was already requested")


def _settings(pairs: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs, each value parsed as JSON (a bare word stays a string)."""
    settings = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise GauntletError(f"Expected --set KEY=VALUE, but got {pair!r}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


@main.command()
@click.argument("model")
@click.option(
    "--defense",
    default="none",
    show_default=True,
    type=click.Choice(["none", "transfer", "distillation", "finetune"]),
)
@click.option("--trigger", type=click.Choice(["pixel", "pattern", "square", "blend"]))
@click.option("--poison-rate", type=float, help="Share of the training set poisoned (0.1).")
@click.option("--mode", type=click.Choice(["all-to-one", "all-to-all"]))
@click.option("--target", type=int, help="All-to-one target class (0).")
@click.option("--set", "pairs", multiple=True, help="Another setting, KEY=VALUE (repeatable).")
@click.option("-n", "n", type=int, default=200, show_default=True, help="Test points scored.")
@click.option("--num-gpus", type=float, default=0.0, show_default=True)
@click.pass_context
def backdoor(ctx, model, defense, trigger, poison_rate, mode, target, pairs, n, num_gpus):
    """Plant a BadNets backdoor in MODEL's architecture and measure a defense against it."""
    from gauntlet.scheduler.train import request_job

    options = {"trigger": trigger, "poison_rate": poison_rate, "mode": mode, "target": target}
    params = {k: v for k, v in options.items() if v is not None} | _settings(pairs)
    app = _app(ctx)
    job_id, new = request_job(
        app.engine, app.queue, model, "backdoor", defense, params, n=n, num_gpus=num_gpus
    )
    console.print(f"backdoor job {job_id} queued" if new else "this job was already requested")


@main.command()
@click.argument("model")
@click.option(
    "--aggregator",
    default="gnmax",
    show_default=True,
    type=click.Choice(["lnmax", "gnmax", "confident-gnmax"]),
)
@click.option("--teachers", type=int, help="Teachers on disjoint partitions (10).")
@click.option("--backdoored-teachers", type=int, help="Teachers given a backdoor (0).")
@click.option("--teacher-gpus", type=float, help="GPUs per teacher task; fractions share one.")
@click.option("--no-noise", is_flag=True, help="Plain plurality vote (no privacy).")
@click.option("--set", "pairs", multiple=True, help="Another setting, KEY=VALUE (repeatable).")
@click.option("-n", "n", type=int, default=200, show_default=True, help="Test points scored.")
@click.pass_context
def pate(ctx, model, aggregator, teachers, backdoored_teachers, teacher_gpus, no_noise, pairs, n):
    """Train PATE teachers (parallel Ray tasks) and a student for MODEL's architecture."""
    from gauntlet.scheduler.train import request_job

    options = {
        "teachers": teachers,
        "backdoored_teachers": backdoored_teachers,
        "teacher_gpus": teacher_gpus,
        "noise": False if no_noise else None,
    }
    params = {k: v for k, v in options.items() if v is not None} | _settings(pairs)
    app = _app(ctx)
    job_id, new = request_job(app.engine, app.queue, model, "pate", aggregator, params, n=n)
    console.print(f"pate job {job_id} queued" if new else "this job was already requested")


@main.command()
@click.option("--dataset")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def backdoors(ctx, dataset, as_json):
    """Backdoor table: trigger and poison rate x defense -> clean accuracy and ASR."""
    from gauntlet.scheduler.track_board import track_table

    rows = track_table(_app(ctx).engine, "backdoor", dataset=dataset)
    _show(rows, as_json, "backdoor", lambda r: [render.backdoor_table(r)])


@main.command()
@click.option("--dataset")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def privacy(ctx, dataset, as_json):
    """Privacy table (PATE): eps, delta, student accuracy and the student's ASR."""
    from gauntlet.scheduler.track_board import track_table

    rows = track_table(_app(ctx).engine, "pate", dataset=dataset)
    _show(rows, as_json, "PATE", lambda r: [render.privacy_table(r)])


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def subtasks(ctx, job_id, as_json):
    """Where and when the pieces of a job (PATE teachers) ran."""
    from gauntlet.scheduler import lifecycle

    rows = lifecycle.list_subtasks(_app(ctx).engine, job_id)
    if as_json:
        _print_json(rows)
    elif not rows:
        console.print(f"Job {job_id} recorded no sub-tasks.")
    else:
        console.print(render.subtasks_table(rows))


@main.command()
@click.option("--dataset")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def calibration(ctx, dataset, as_json):
    """Calibration table: ECE before and after temperature scaling, NLL, Brier, under attack."""
    from gauntlet.scheduler.calibration_board import calibration_table

    rows = calibration_table(_app(ctx).engine, dataset=dataset)
    _show(rows, as_json, "calibration", lambda r: [render.calibration_table(r)])


@main.command()
@click.option("--dataset")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def corruption(ctx, dataset, as_json):
    """Corruption table: accuracy and ECE under common corruptions at five severities."""
    from gauntlet.scheduler.calibration_board import calibration_table

    rows = calibration_table(_app(ctx).engine, dataset=dataset, kind="corruption")
    _show(rows, as_json, "corruption", lambda r: [render.corruption_table(r)])


@main.command()
@click.option("--dataset")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def transfer(ctx, dataset, as_json):
    """Transferability matrix: success of examples crafted on row model against column."""
    from gauntlet.scheduler.transfer import transfer_matrix

    cells = transfer_matrix(_app(ctx).engine, dataset=dataset)
    _show(cells, as_json, "transfer", render.transfer_tables)


@main.command()
@click.option("--drain", is_flag=True, help="Exit once the queue is empty.")
@click.option("--max-in-flight", type=int, help="Ray tasks to keep running (default 4).")
@click.option("--local", is_flag=True, help="Run jobs in this process instead of on Ray.")
@click.option("--num-cpus", type=int, help="CPUs of the local Ray (default: all).")
@click.option("--num-gpus", type=float, help="GPUs of the local Ray (default: detected).")
@click.pass_context
def scheduler(ctx, drain, max_in_flight, local, num_cpus, num_gpus):
    """Run queued jobs on Ray and write their results (a daemon unless --drain)."""
    from gauntlet.scheduler.run import run_scheduler

    stop = {"flag": False}

    def request_stop(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, request_stop)
    stats = run_scheduler(
        _app(ctx),
        drain=drain,
        local=local,
        max_in_flight=max_in_flight,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        console=console,
        should_stop=lambda: stop["flag"],
    )
    console.print(
        f"done {stats.done}, failed {stats.failed}, retried {stats.retried}, "
        f"dead-lettered {stats.dead}"
    )


@main.command()
@click.option("--suite", "suites", multiple=True, help="Also expand this suite for every model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def nightly(ctx, suites, as_json):
    """Enqueue every model x suite evaluation that has no result yet."""
    from gauntlet.scheduler.nightly import nightly as run_nightly

    app = _app(ctx)
    report = run_nightly(
        app.engine, app.queue, app.redis, prefix=app.settings.redis_prefix, suites=list(suites)
    )
    if as_json:
        _print_json(asdict(report))
    else:
        console.print(
            f"{report.models} models, {report.expanded} evaluations, "
            f"{report.new_jobs} new jobs, {report.enqueued} enqueued"
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
    console.print(f"{name} is under {app.settings.data_root}")


@main.command("list")
@click.argument("what", type=click.Choice(["attacks", "archs", "datasets", "suites", "models"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_cmd(ctx, what, as_json):
    """List registered attacks, architectures, datasets, suites or submitted models."""
    rows = render.registry_rows(what, _app(ctx) if what == "models" else None)
    if as_json:
        _print_json(rows)
    else:
        console.print(render.rows_table(what, rows))


if __name__ == "__main__":  # pragma: no cover
    main()
