"""The HTTP API: FastAPI over the same service layer as the CLI.

``create_api(app)`` builds the application for one ``App``; ``gauntlet serve`` runs it
on uvicorn. Route handlers only translate HTTP to service calls and back: every rule
(who may see what, quotas, caps) lives in the service layer, so the CLI and the API
cannot disagree. Reads are open (anonymous readers see public models); every write
needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import inspect

from fastapi import FastAPI

from gauntlet.scheduler.api import boards, deps, errors, jobs, models, system
from gauntlet.scheduler.app import App


def create_api(app: App) -> FastAPI:
    api = FastAPI(
        title="gauntlet",
        summary="Robustness evaluation and leaderboards for image classifiers",
        version=_version(),
        default_response_class=errors.FiniteJSONResponse,
    )
    api.state.gauntlet = app
    errors.install(api)
    for router in (models.router, jobs.router, boards.router, system.router):
        api.include_router(router, prefix="/api")
    try:  # the web pages, when that package is installed beside this one
        from gauntlet.scheduler.web import install
    except ImportError:
        pass
    else:
        # The pages take who is asking from a callable, when their version accepts one.
        if "viewer" in inspect.signature(install).parameters:
            install(api, app, viewer=deps.page_viewer(app))
        else:
            install(api, app)
    return api


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gauntlet-eval")
    except PackageNotFoundError:
        return "0"
