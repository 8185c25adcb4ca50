"""The service layer: what the CLI (and a future HTTP API) asks of the scheduler.

Each function takes the process's ``App`` and delegates to the module that does the
work (submit, train, lifecycle, boards); none of them prints. Reading a board touches
only the database, so ``gauntlet leaderboard`` never starts Redis or Ray.
"""

from __future__ import annotations

from gauntlet.scheduler import inspection, intake, lifecycle, operator, reconcile, train
from gauntlet.scheduler.app import App
from gauntlet.scheduler.boards.calibration import calibration_table
from gauntlet.scheduler.boards.leaderboard import leaderboard as leaderboard_entries
from gauntlet.scheduler.boards.tracks import track_table
from gauntlet.scheduler.boards.transfer import transfer_matrix
from gauntlet.scheduler.submit import SubmitReport
from gauntlet.scheduler.submit import submit as submit_weights


def submit_model(app: App, weights, **options) -> SubmitReport:
    """Submit a safetensors model; ``options`` are ``submit.submit``'s keywords."""
    return submit_weights(app.settings, app.engine, app.queue, weights, **options)


def list_jobs(app: App, **filters) -> list[dict]:
    """Jobs newest first; ``filters`` are ``lifecycle.list_jobs``'s keywords."""
    return lifecycle.list_jobs(app.engine, **filters)


def list_models(app: App) -> list[dict]:
    return lifecycle.list_models(app.engine)


def subtasks(app: App, job_id: int) -> list[dict]:
    return lifecycle.list_subtasks(app.engine, job_id)


def job_detail(app: App, job_id: int) -> dict:
    """One job with its metrics, sub-tasks and, while it runs, its progress."""
    return inspection.job_detail(app, job_id)


def active_jobs(app: App, **filters) -> int:
    """Queued and running jobs; ``filters`` are ``model`` and ``dataset``."""
    return inspection.active_jobs(app, **filters)


def cancel_jobs(app: App, job_ids=(), *, model: str | None = None) -> operator.CancelReport:
    """Cancel jobs by id, or every queued and running job of a model."""
    return operator.cancel(app, job_ids, model=model)


def rerun_jobs(app: App, job_ids=(), **selection) -> operator.RerunReport:
    """Queue finished jobs again; ``selection`` is ``failed``, ``dead`` and ``force``."""
    return operator.rerun(app, job_ids, **selection)


def queue_state(app: App) -> dict:
    return inspection.queue_state(app)


def repair_queue(app: App) -> reconcile.RepairReport:
    """Give every stranded job one stream entry (what schedulers do once per lease)."""
    return reconcile.repair_queue(app)


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
