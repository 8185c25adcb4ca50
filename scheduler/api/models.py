"""``/api/models``: list, show, upload and publish models."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import service, uploads
from gauntlet.scheduler.accounts import Viewer
from gauntlet.scheduler.api.deps import get_app, user, viewer
from gauntlet.scheduler.app import App
from gauntlet.scheduler.intake import comma_floats

router = APIRouter(tags=["models"])

# The body is the file itself, streamed: declared here so clients (and the OpenAPI
# document) know to send bytes rather than a form.
_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}

Name = Annotated[str | None, Query(max_length=200, description="Display name (default: upload).")]


@router.get("/models")
def list_models(app: App = Depends(get_app), who: Viewer | None = Depends(viewer)) -> list[dict]:
    """Every model the caller may see: public ones, plus the caller's own (admins: all)."""
    return service.visible_models(app, who)


@router.get("/models/{model_id}")
def show_model(
    model_id: str, app: App = Depends(get_app), who: Viewer | None = Depends(viewer)
) -> dict:
    return service.model_detail(app, who, model_id)


@router.post("/models", status_code=201, openapi_extra=_BODY)
async def upload_model(
    request: Request,
    arch: Annotated[str, Query(max_length=200)],
    dataset: Annotated[str, Query(max_length=100)],
    suite: Annotated[str, Query(max_length=200)] = "quick",
    name: Name = None,
    n: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    mean: Annotated[str | None, Query(max_length=200, description="e.g. 0.5,0.5,0.5")] = None,
    std: Annotated[str | None, Query(max_length=200)] = None,
    num_classes: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    sha256: Annotated[str | None, Query(max_length=200, description="Checked if given.")] = None,
    card: Annotated[
        str | None, Query(max_length=20_000, description="Model card as JSON (RobustBench fields).")
    ] = None,
    app: App = Depends(get_app),
    who: Viewer = Depends(user),
) -> dict:
    """Upload safetensors weights as the request body and submit them (private until
    published). 413 past the size cap, 400 when ``sha256`` does not match the body."""
    overrides = {"mean": comma_floats(mean, "mean"), "std": comma_floats(std, "std")}
    overrides["num_classes"] = num_classes
    checked_card = None if card is None else _card(card)
    await run_in_threadpool(service.check_quota, app, who, submitting=True)
    cap = app.settings.max_weights_bytes
    uploads.check_length(request.headers.get("content-length"), cap)
    upload = await uploads.spool(request.stream(), app.settings.home / "uploads", cap)
    try:
        uploads.check_digest(upload, sha256)
        report = await run_in_threadpool(
            service.submit_upload,
            app,
            who,
            upload,
            arch=arch,
            dataset=dataset,
            suite=suite,
            name=name or "upload",
            n=n,
            input_overrides=overrides,
            card=checked_card,
        )
    finally:
        upload.discard()
    # A known public model (the same content submitted from the CLI) stays public.
    model = await run_in_threadpool(service.model_detail, app, who, report.model_id)
    shown = {"public": model["public"], "owner": model["owner"]}
    return {**asdict(report), **shown, "sha256": upload.sha256, "bytes": upload.size}


@router.post("/models/{model_id}/publish")
def publish_model(model_id: str, app: App = Depends(get_app), who: Viewer = Depends(user)) -> dict:
    """Make one of the caller's models (an admin: any model) visible to everyone."""
    return service.publish_model(app, model_id, who)


def _card(text: str) -> dict:
    """A card sent as JSON text, checked as ``gauntlet submit --card`` checks a file."""
    from gauntlet.scheduler.cards import check_card

    try:
        data = json.loads(text)
    except ValueError:
        raise GauntletError("Expected `card` to be a JSON object of model-card fields") from None
    return check_card(data)
