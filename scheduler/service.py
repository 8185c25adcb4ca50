"""The service layer: what the CLI (and a future HTTP API) asks of the scheduler.

Each function takes the process's ``App`` and delegates to the module that does the
work (submit, train, lifecycle, boards); none of them prints. Reading a board touches
only the database, so ``gauntlet leaderboard`` never starts Redis or Ray.
"""

from __future__ import annotations

from gauntlet.scheduler import (
    accounts,
    inspection,
    intake,
    lifecycle,
    operator,
    ownership,
    quotas,
    reconcile,
    train,
    uploads,
    verify,
)
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


def verify_job(app: App, job_id: int) -> verify.VerifyReport:
    """Rerun a done eval job in this process and compare outcomes and adversarial hash."""
    return verify.verify(app, job_id)


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


def model_report(app: App, ref: str) -> dict:
    """One model (a name or id prefix): its card and every job with every metric."""
    from gauntlet.scheduler.interop import model_report as report

    return report(app.engine, ref)


def export(app: App, fmt: str, out, *, dataset: str | None = None) -> list:
    """Write the leaderboard as RobustBench model_info files, CSV or JSON under ``out``."""
    from gauntlet.scheduler.interop import write_export

    return write_export(app.engine, fmt, out, dataset=dataset)


# Accounts, visibility and quotas: what the HTTP API asks on behalf of a ``Viewer``
# (an account, or None for an anonymous read). The CLI is the local operator, who sees
# and operates everything, so its commands above pass no viewer.


def add_user(app: App, name: str, *, admin: bool = False) -> str:
    """Create an account; returns its token, which is shown this once."""
    return accounts.add_user(app.engine, name, admin=admin)


def new_token(app: App, name: str) -> str:
    return accounts.new_token(app.engine, name)


def remove_user(app: App, name: str) -> int:
    """Delete an account and its tokens; returns how many models it owned."""
    return accounts.remove_user(app.engine, name)


def list_users(app: App) -> list[dict]:
    return accounts.list_users(app.engine)


def authenticate(app: App, token: str) -> accounts.Viewer | None:
    return accounts.authenticate(app.engine, token)


def publish_model(app: App, ref: str, viewer: accounts.Viewer = accounts.OPERATOR) -> dict:
    """Make a model public: the operator names it, an account gives its id."""
    return ownership.publish(app.engine, viewer, ref)


def visible_models(app: App, viewer) -> list[dict]:
    return ownership.list_models(app.engine, viewer)


def model_detail(app: App, viewer, model_id: str) -> dict:
    return ownership.get_model(app.engine, viewer, model_id)


def visible_jobs(app: App, viewer, **filters) -> list[dict]:
    return ownership.list_jobs(app.engine, viewer, **filters)


def visible_job_detail(app: App, viewer, job_id: int) -> dict:
    ownership.job_model(app.engine, viewer, job_id)
    return inspection.job_detail(app, job_id)


def _writable_job(app: App, viewer, job_id: int) -> None:
    ownership.check_writable(ownership.job_model(app.engine, viewer, job_id), viewer)


def cancel_job_as(app: App, viewer, job_id: int) -> operator.CancelReport:
    _writable_job(app, viewer, job_id)
    return operator.cancel(app, [job_id])


def rerun_job_as(app: App, viewer, job_id: int, *, force: bool = False) -> operator.RerunReport:
    """Rerun a job of the viewer's (or, for an admin, anyone's); counts against quota."""
    _writable_job(app, viewer, job_id)
    quotas.check(app.engine, app.settings, viewer, submitting=False)
    return operator.rerun(app, [job_id], force=force)


BOARDS = {
    "leaderboard": leaderboard,
    "calibration": calibration,
    "corruption": corruption,
    "transfer": transfer,
    "backdoor": backdoors,
    "privacy": privacy,
}


def board(app: App, name: str, *, dataset: str | None = None, viewer=accounts.OPERATOR) -> list:
    """A board's rows as ``viewer`` may see them (hidden models dropped, ranks recounted)."""
    rows = BOARDS[name](app, dataset=dataset)
    return ownership.filter_board(name, rows, ownership.visible_ids(app.engine, viewer))


def queue_view(app: App, viewer) -> dict:
    """``queue_state`` for an admin; others get the counts only, since dead letters and
    stranded jobs name jobs of private models and consumers name the scheduler hosts."""
    state = queue_state(app)
    if viewer is not None and viewer.is_admin:
        return state
    state["dead_letters"] = len(state["dead_letters"])
    state["stranded"] = len(state["stranded"])
    state["pending_by_consumer"] = len(state["pending_by_consumer"])
    state.pop("oldest_queued", None)
    return state


def check_quota(app: App, viewer, *, submitting: bool) -> None:
    quotas.check(app.engine, app.settings, viewer, submitting=submitting)


def usage(app: App, viewer) -> dict:
    return quotas.usage(app.engine, app.settings, viewer)


def submit_upload(app: App, viewer, upload, **options) -> SubmitReport:
    """Submit weights received over HTTP for ``viewer``; ``options`` are submit's."""
    return uploads.submit_upload(app, viewer, upload, **options)


def health(app: App) -> dict:
    """Whether the database and the queue answer; each part says ok or what failed."""
    parts = {}
    for part, probe in (("database", _ping_database), ("queue", lambda a: a.redis.ping())):
        try:
            probe(app)
            parts[part] = "ok"
        except Exception as exc:  # health reports every failure; it never raises one
            parts[part] = f"unavailable: {type(exc).__name__}"
    return {"status": "ok" if set(parts.values()) == {"ok"} else "degraded", **parts}


def _ping_database(app: App) -> None:
    import sqlalchemy as sa

    with app.engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
