"""Running the dispatcher from the CLI: executor choice, Ray start-up, a progress bar."""

from __future__ import annotations

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.app import App
from gauntlet.scheduler.executors import LocalExecutor, RayExecutor
from gauntlet.scheduler.outage import service_of
from gauntlet.scheduler.submit import enqueue_new

_FINAL = {"done", "failed", "dead"}


def make_executor(app: App, *, local: bool, num_cpus=None, num_gpus=None):
    if local:
        return LocalExecutor()
    from gauntlet.cluster.ray_conn import init_ray

    if not app.settings.ray_address:
        # A local Ray is ours to clean up, even if this process is SIGKILLed.
        from gauntlet.scheduler.watchdog import start_watchdog

        start_watchdog()
    init_ray(app.settings, num_cpus=num_cpus, num_gpus=num_gpus)
    return RayExecutor(transport=app.settings.artifact_transport_resolved)


def run_scheduler(
    app: App,
    *,
    drain: bool,
    local: bool = False,
    max_in_flight=None,
    num_cpus=None,
    num_gpus=None,
    console=None,
    should_stop=None,
):
    # Rows a crashed submit inserted without enqueueing get their stream entry now; the
    # dispatcher's reconciler then repairs whatever else the stream lost, so a service
    # that is away at this moment only leaves the work to it.
    pending = []
    try:
        enqueue_new(app.engine, app.queue)
        pending = [
            j
            for j in lifecycle.list_jobs(app.engine, limit=None)
            if str(getattr(j["status"], "value", j["status"])) in ("queued", "running")
        ]
    except Exception as exc:  # noqa: BLE001 - only an outage may pass; it is ridden through
        if service_of(exc) is None:
            raise
    executor = make_executor(app, local=local, num_cpus=num_cpus, num_gpus=num_gpus)
    if app.settings.metrics_port:
        from gauntlet.scheduler.prometheus import start_metrics_server

        start_metrics_server(app, app.settings.metrics_port)
    if console is None or not drain:
        dispatcher = app.dispatcher(executor, max_in_flight=max_in_flight)
        return dispatcher.run(drain=drain, should_stop=should_stop)

    columns = (
        TextColumn("[bold]evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=len(pending))

        def on_event(kind: str, job_id: int, message: str) -> None:
            if kind in _FINAL or kind == "cancelled":
                progress.advance(task)
            if kind in ("failed", "dead"):
                # The message quotes user text (names, paths): escaped, never markup.
                progress.console.print(
                    f"[red]job {job_id} failed:[/red] {escape(message)}", highlight=False
                )
            progress.update(task, description=f"job {job_id} {kind}")

        dispatcher = app.dispatcher(executor, max_in_flight=max_in_flight, on_event=on_event)
        return dispatcher.run(drain=True, should_stop=should_stop)
