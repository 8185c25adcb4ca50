"""The web leaderboard: server-rendered HTML pages, usable without JavaScript.

``install(api, app)`` adds the page routes to a FastAPI application; the API's app
factory calls it, and a test can call it on a bare ``FastAPI()``. Pages read through
the service layer (SQL only; Redis only for a running job's progress) and show only
the models the viewer may see (``ownership.visible_ids``, the API's rule).

The viewer is whatever the API's authentication left on ``request.state`` (``viewer``
or ``user``), or what the ``viewer`` callable given to ``install`` returns; with
neither, every request is anonymous and sees public models only.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import service
from gauntlet.scheduler.web import boards
from gauntlet.scheduler.web.data import get_model, visible, visible_models
from gauntlet.scheduler.web.html import CSS, error_page, page
from gauntlet.scheduler.web.images import image_names
from gauntlet.scheduler.web.model_page import job_body, model_body

__all__ = ["install"]


def _default_viewer(request: Request):
    state = request.state
    return getattr(state, "viewer", None) or getattr(state, "user", None)


def install(api: FastAPI, app, *, viewer: Callable[[Request], object] | None = None) -> None:
    """Add the leaderboard's pages and stylesheet to ``api``, reading from ``app``."""
    who = viewer or _default_viewer

    # Sync handlers: FastAPI runs them in its thread pool, so SQL never blocks the loop.
    # Path and query values arrive as plain strings and are checked here, so a bad one
    # gets this site's 400 page rather than the framework's JSON error.

    @api.get("/static/gauntlet.css", include_in_schema=False)
    def stylesheet() -> Response:
        return Response(CSS, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    def leaderboard_page(request: Request, dataset=None, norm=None):
        params = request.query_params
        try:
            sort, order = boards.sort_params(params.get("sort"), params.get("order"))
        except boards.BadRequest as exc:
            return error_page(400, str(exc))
        if dataset is not None:
            from gauntlet.workers.attacks.norms import NORMS
            from gauntlet.workers.datasets import dataset_names

            if dataset not in dataset_names() or norm not in NORMS:
                return error_page(404, f"there is no leaderboard for {dataset} {norm}")
        models = visible_models(app.engine, who(request))
        entries = service.leaderboard(app, dataset=dataset)
        if norm is not None:
            entries = [e for e in entries if e.norm == norm]
        title = "Leaderboard" if dataset is None else f"Leaderboard: {dataset} {norm}"
        return page(title, boards.leaderboard_html(entries, models, sort, order, request.url.path))

    @api.get("/", include_in_schema=False)
    def index(request: Request):
        return leaderboard_page(request)

    @api.get("/leaderboard/{dataset}/{norm}", include_in_schema=False)
    def leaderboard(request: Request, dataset: str, norm: str):
        return leaderboard_page(request, dataset, norm)

    @api.get("/models/{model_id}", include_in_schema=False)
    def model(request: Request, model_id: str):
        row = get_model(app.engine, model_id)
        if row is None or not visible(app.engine, model_id, who(request)):
            # A private model reads as absent: its existence is not the viewer's to know.
            return error_page(404, f"there is no model {model_id}")
        models = visible_models(app.engine, who(request))
        ds = row["dataset"]
        transfer = [
            c
            for c in service.transfer(app, dataset=ds)
            if c.source_id in models and c.target_id in models
        ]
        backdoor = [r for r in service.backdoors(app, dataset=ds) if r.model_id == model_id]
        pate = [r for r in service.privacy(app, dataset=ds) if r.model_id == model_id]
        body = model_body(
            app.engine, row, service.leaderboard(app, dataset=ds), transfer, backdoor, pate
        )
        return page(f"Model {row['name']}", body)

    boards_pages = {
        "calibration": ("Calibration", service.calibration, boards.calibration_html),
        "corruption": ("Corruption robustness", service.corruption, boards.corruption_html),
        "transfer": ("Transfer attacks", service.transfer, boards.transfer_html),
        "backdoor": ("Backdoors", service.backdoors, boards.backdoor_html),
        "privacy": ("Privacy (PATE)", service.privacy, boards.privacy_html),
    }

    @api.get("/boards/{name}", include_in_schema=False)
    def board(request: Request, name: str):
        if name not in boards_pages:
            return error_page(404, f"there is no board {name}; boards: {', '.join(boards_pages)}")
        dataset = request.query_params.get("dataset")
        title, read, render = boards_pages[name]
        models = visible_models(app.engine, who(request))
        return page(title, render(read(app, dataset=dataset or None), models))

    def visible_job(request: Request, job_id: str):
        """(job detail, None), or (None, the error page) for a bad, absent or hidden job."""
        if not job_id.isdigit() or len(job_id) > 18:
            return None, error_page(400, f"a job id is a number, not {job_id!r}")
        try:
            detail = service.job_detail(app, int(job_id))
        except GauntletError:
            detail = None
        row = detail and get_model(app.engine, detail["model_id"])
        if not row or not visible(app.engine, row["id"], who(request)):
            return None, error_page(404, f"there is no job {job_id}")
        return detail, None

    @api.get("/jobs/{job_id}", include_in_schema=False)
    def job(request: Request, job_id: str):
        detail, error = visible_job(request, job_id)
        if error is not None:
            return error
        running = detail["status"] in ("queued", "running")
        return page(f"Job {job_id}", job_body(detail), refresh=2 if running else None)

    @api.get("/jobs/{job_id}/images/{name}.png", include_in_schema=False)
    def job_image(request: Request, job_id: str, name: str):
        detail, error = visible_job(request, job_id)
        if error is not None:
            return error
        sha = image_names(detail.get("details")).get(name)
        if sha is None:
            return error_page(404, f"job {job_id} has no image {name!r}")
        try:
            data = ArtifactStore(app.settings.artifacts).get(sha).read_bytes()
        except GauntletError as exc:
            return error_page(404, str(exc))
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
