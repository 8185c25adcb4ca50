"""The service layer: what the CLI (and a future HTTP API) asks of the scheduler.

Each function takes the process's ``App`` and delegates to the module that does the
work (submit, train, lifecycle, boards); none of them prints. Reading a board touches
only the database, so ``gauntlet leaderboard`` never starts Redis or Ray.
"""

from __future__ import annotations

from gauntlet.scheduler import intake, lifecycle, train
from gauntlet.scheduler.app import App
from gauntlet.scheduler.boards.calibration import calibration_table
from gauntlet.scheduler.boards.leaderboard import leaderboard as leaderboard_entries
from gauntlet.scheduler.boards.tracks import track_table
from gauntlet.scheduler.boards.transfer import transfer_matrix
from gauntlet.scheduler.submit import SubmitReport
from gauntlet.scheduler.submit import submit as submit_weights


def submit_model(app: App, weights, **options) -> SubmitReport:
    """Submit a safetensors model; ``options`` are ``submit.submit``'s keywords.

    The intake checks (caps, names, dtypes) run first, so a refused submission stores
    nothing; a note they return (weights converted to float32) goes on the model row.
    """
    note = intake.check_submission(app.settings, weights, **options)
    report = submit_weights(app.settings, app.engine, app.queue, weights, **options)
    intake.store_note(app.engine, report.model_id, note)
    return report


def list_jobs(app: App, **filters) -> list[dict]:
    """Jobs newest first; ``filters`` are ``lifecycle.list_jobs``'s keywords."""
    return lifecycle.list_jobs(app.engine, **filters)


def list_models(app: App) -> list[dict]:
    return lifecycle.list_models(app.engine)


def subtasks(app: App, job_id: int) -> list[dict]:
    return lifecycle.list_subtasks(app.engine, job_id)


def request_training(
    app: App, model: str, method: str, params: dict, *, static=(), num_gpus: float = 0.0
) -> tuple[int, bool]:
    """Queue a train job for ``model``; ``static`` names ensemble-at's pre-trained models."""
    params = dict(params)
    suite = params.get("suite", "quick")
    if isinstance(suite, str):  # the name the user gave is stored with the job
        intake.check_name(suite, "suite name")
    if static:
        params["static_models"] = [train.find_model(app.engine, ref)["id"] for ref in static]
    return train.request_training(app.engine, app.queue, model, method, params, num_gpus=num_gpus)


def request_job(
    app: App, model: str, kind: str, method: str, params: dict, **options
) -> tuple[int, bool]:
    """Queue a backdoor or pate job for ``model``; (id or 0, new?)."""
    return train.request_job(app.engine, app.queue, model, kind, method, params, **options)


def leaderboard(app: App, *, dataset: str | None = None) -> list:
    return leaderboard_entries(app.engine, dataset=dataset)


def calibration(app: App, *, dataset: str | None = None) -> list:
    return calibration_table(app.engine, dataset=dataset)


def corruption(app: App, *, dataset: str | None = None) -> list:
    return calibration_table(app.engine, dataset=dataset, kind="corruption")


def transfer(app: App, *, dataset: str | None = None) -> list:
    return transfer_matrix(app.engine, dataset=dataset)


def backdoors(app: App, *, dataset: str | None = None) -> list:
    return track_table(app.engine, "backdoor", dataset=dataset)


def privacy(app: App, *, dataset: str | None = None) -> list:
    return track_table(app.engine, "pate", dataset=dataset)
