"""``/api/jobs``: list and show jobs, cancel and rerun them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query

from gauntlet.scheduler import service
from gauntlet.scheduler.accounts import Viewer
from gauntlet.scheduler.api.deps import get_app, user, viewer
from gauntlet.scheduler.app import App

router = APIRouter(tags=["jobs"])

# Job ids are SQL integers: bounded so a huge number is a 422, not a database error.
JobId = Annotated[int, Path(ge=1, le=2**62)]


@router.get("/jobs")
def list_jobs(
    status: Literal["queued", "running", "done", "failed"] | None = None,
    model: Annotated[str | None, Query(max_length=200, description="Name or id prefix.")] = None,
    dataset: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    app: App = Depends(get_app),
    who: Viewer | None = Depends(viewer),
) -> list[dict]:
    """Jobs of the models the caller may see, newest first."""
    filters = {"status": status, "model": model, "dataset": dataset, "limit": limit}
    return service.visible_jobs(app, who, **filters)


@router.get("/jobs/{job_id}")
def show_job(job_id: JobId, app: App = Depends(get_app), who=Depends(viewer)) -> dict:
    """One job in full: spec, metrics, sub-tasks and, while it runs, its progress."""
    return service.visible_job_detail(app, who, job_id)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: JobId, app: App = Depends(get_app), who: Viewer = Depends(user)) -> dict:
    return asdict(service.cancel_job_as(app, who, job_id))


@router.post("/jobs/{job_id}/rerun")
def rerun_job(
    job_id: JobId,
    force: bool = Query(False, description="Also rerun a job that is done."),
    app: App = Depends(get_app),
    who: Viewer = Depends(user),
) -> dict:
    return asdict(service.rerun_job_as(app, who, job_id, force=force))
