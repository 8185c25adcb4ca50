"""``/api/health``, ``/api/queue`` and ``/api/me``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from gauntlet.scheduler import service
from gauntlet.scheduler.accounts import Viewer
from gauntlet.scheduler.api.deps import get_app, user, viewer
from gauntlet.scheduler.app import App

router = APIRouter(tags=["service"])


@router.get("/health")
def health(app: App = Depends(get_app)):
    """200 when the database and the queue answer, 503 (same body) when one does not."""
    report = service.health(app)
    return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)


@router.get("/queue")
def queue(app: App = Depends(get_app), who: Viewer | None = Depends(viewer)) -> dict:
    """Stream length, pending and dead-lettered entries, job counts, stranded jobs
    (for non-admins, how many of each rather than which)."""
    return service.queue_view(app, who)


@router.get("/me")
def me(app: App = Depends(get_app), who: Viewer = Depends(user)) -> dict:
    """The caller's account and what it has used of its quotas."""
    return {"name": who.name, "is_admin": who.is_admin, **service.usage(app, who)}
