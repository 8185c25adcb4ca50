"""Weights uploaded over HTTP: streamed to a private spool file, then submitted.

The body is written in chunks as it arrives and counted on the way, so an upload past
``GAUNTLET_MAX_WEIGHTS_BYTES`` is refused as soon as it crosses the cap, without
holding it in memory and without reading the rest. The spool file lives under the
state directory, never in the artifact store, and is deleted whatever happens: only
a submission that passes every check puts anything into the store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import lifecycle, ownership
from gauntlet.scheduler.accounts import AccessError, Conflict, Viewer
from gauntlet.scheduler.submit import SubmitReport, default_input_spec, model_key


class TooLarge(AccessError):
    status = 413


@dataclass
class Upload:
    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _too_large(max_bytes: int, size: int | None = None) -> TooLarge:
    got = "is larger than" if size is None else f"has {size:,} bytes, above"
    return TooLarge(f"the upload {got} the cap of {max_bytes:,} bytes (GAUNTLET_MAX_WEIGHTS_BYTES)")


def check_length(header: str | None, max_bytes: int) -> None:
    """Refuse at once a body whose declared length is already past the cap."""
    if header is None:
        return
    try:
        size = int(header)
    except ValueError:
        raise GauntletError("Expected Content-Length to be a number of bytes") from None
    if size > max_bytes:
        raise _too_large(max_bytes, size)


async def spool(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> Upload:
    """Write the body to a new file under ``folder``, hashing and counting it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=".safetensors")
    path = Path(name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:  # a refusal, a client that went away, a cancelled request
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise GauntletError("the upload is empty: send the safetensors file as the request body")
    return Upload(path, digest.hexdigest(), size)


def check_digest(upload: Upload, declared: str | None) -> None:
    if declared is not None and declared.strip().lower() != upload.sha256:
        raise GauntletError(
            f"the upload's sha256 is {upload.sha256}, not the declared {declared[:64]!r}: "
            "the file was changed or cut short on the way"
        )


def submit_upload(app, viewer: Viewer, upload: Upload, **options) -> SubmitReport:
    """Submit a spooled upload for ``viewer``; ``options`` are ``submit.submit``'s.

    A model is content-addressed, so the same weights, architecture, dataset and input
    spec already submitted by another account are that account's model: submitting
    them again is refused rather than adding jobs to a model the submitter cannot see.
    """
    from gauntlet.scheduler import service

    overrides = options.get("input_overrides") or {}
    spec = default_input_spec(options["dataset"], **overrides)
    model_id = model_key(upload.sha256, options["arch"], options["dataset"], spec)
    _check_not_hidden(app, viewer, model_id)
    try:
        report = service.submit_model(app, upload.path, owner_id=viewer.id, **options)
    except AccessError:
        raise
    except GauntletError as exc:
        # Messages name the weights file: the spool file's path means nothing to the
        # client and says where the server keeps its state.
        raise GauntletError(str(exc).replace(str(upload.path), "the upload")) from None
    _check_not_hidden(app, viewer, report.model_id)
    return report


def _check_not_hidden(app, viewer: Viewer, model_id: str) -> None:
    if lifecycle.get_model(app.engine, model_id) is None:
        return
    try:
        ownership.get_model(app.engine, viewer, model_id)
    except AccessError:
        raise Conflict(
            "a model with these weights, architecture, dataset and input spec was already "
            "submitted by another account"
        ) from None
