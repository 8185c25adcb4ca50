"""The service layer over HTTP: what the CLI calls when ``GAUNTLET_API_URL`` is set.

``RemoteService`` answers the same calls as ``gauntlet.scheduler.service`` (without the
``app`` argument) by asking a ``gauntlet serve`` API, and rebuilds the same dataclasses
from its JSON, so every command prints remotely exactly what it prints locally. The
token goes in the ``Authorization`` header and nowhere else: error messages quote the
server's ``detail``, never the request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.boards.calibration import CalibrationRow
from gauntlet.scheduler.boards.leaderboard import Entry
from gauntlet.scheduler.boards.tracks import TrackRow
from gauntlet.scheduler.boards.transfer import Cell
from gauntlet.scheduler.operator import CancelReport, RerunReport
from gauntlet.scheduler.submit import SubmitReport

# The CLI's board commands and the API's board paths, with each board's row type.
BOARDS = {
    "leaderboard": ("leaderboard", Entry),
    "calibration": ("calibration", CalibrationRow),
    "corruption": ("corruption", CalibrationRow),
    "transfer": ("transfer", Cell),
    "backdoors": ("backdoor", TrackRow),
    "privacy": ("privacy", TrackRow),
}
TIMEOUT_S = 60.0


def config_path() -> Path:
    """Where ``gauntlet login`` keeps the token: readable by its user only."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gauntlet" / "token"


def save_token(token: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created with mode 0600 from the start, so the token is never briefly readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as out:
        out.write(token.strip() + "\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


def load_token() -> str | None:
    token = os.environ.get("GAUNTLET_TOKEN")
    if token:
        return token
    path = config_path()
    return path.read_text().strip() or None if path.is_file() else None


def _rebuild(cls: type, row: dict) -> Any:
    """``cls`` from its JSON form: tuples come back as lists, which the tables accept."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in names})


class RemoteService:
    def __init__(self, url: str, token: str | None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT_S)

    def _call(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, f"/api{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise GauntletError(
                f"Cannot reach the API at {self.url} ({type(exc).__name__})"
            ) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.reason_phrase)
            except ValueError:
                detail = response.reason_phrase
            if not isinstance(detail, str):  # FastAPI's validation errors are a list
                detail = "; ".join(str(d.get("msg", d)) for d in detail)
            raise GauntletError(f"{detail} (HTTP {response.status_code})")
        return response.json()

    def whoami(self) -> dict:
        """The token's account (``/api/me``): how ``gauntlet login`` checks a token."""
        return self._call("GET", "/me")

    # -- boards -----------------------------------------------------------------------

    def board(self, name: str, *, dataset: str | None = None) -> list:
        path, cls = BOARDS[name]
        params = {"dataset": dataset} if dataset else {}
        return [_rebuild(cls, row) for row in self._call("GET", f"/{path}", params=params)]

    def __getattr__(self, name: str):
        if name in BOARDS:
            return lambda *, dataset=None: self.board(name, dataset=dataset)
        if name.startswith("_"):
            raise AttributeError(name)
        # A command the API does not offer: say so instead of failing with a traceback.
        raise GauntletError(
            f"this command works on the local stack only (unset GAUNTLET_API_URL); "
            f"the API has no {name.replace('_', ' ')}"
        )

    # -- jobs and models --------------------------------------------------------------

    def list_jobs(self, **filters) -> list[dict]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/jobs", params=params)

    def active_jobs(self, *, model: str | None = None, dataset: str | None = None) -> int:
        """Queued and running jobs the caller may see (what ``jobs --watch`` waits on)."""
        scope = {k: v for k, v in {"model": model, "dataset": dataset}.items() if v}
        counts = [
            len(self._call("GET", "/jobs", params={**scope, "status": status, "limit": 1000}))
            for status in ("queued", "running")
        ]
        return sum(counts)

    def job_detail(self, job_id: int) -> dict:
        return self._call("GET", f"/jobs/{job_id}")

    def cancel_jobs(self, job_ids=(), *, model: str | None = None) -> CancelReport:
        if model is not None:
            raise GauntletError("cancel --model works on the local stack only; name job ids")
        reports = [self._call("POST", f"/jobs/{job_id}/cancel") for job_id in job_ids]
        return _merge(CancelReport, reports)

    def rerun_jobs(self, job_ids=(), *, failed=False, dead=False, force=False) -> RerunReport:
        if failed or dead:
            raise GauntletError("rerun --failed/--dead works on the local stack only")
        params = {"force": "true"} if force else {}
        reports = [self._call("POST", f"/jobs/{j}/rerun", params=params) for j in job_ids]
        return _merge(RerunReport, reports)

    def submit_model(self, weights, **options) -> SubmitReport:
        path = Path(weights)
        if not path.is_file():
            raise GauntletError(f"weights file {str(path)!r} does not exist")
        card = options.pop("card", None)
        overrides = options.pop("input_overrides", None) or {}
        params = {k: v for k, v in options.items() if v is not None}
        for key in ("mean", "std"):
            if overrides.get(key) is not None:
                params[key] = ",".join(str(v) for v in overrides[key])
        if overrides.get("num_classes") is not None:
            params["num_classes"] = overrides["num_classes"]
        if card is not None:  # checked here already; the server checks it again
            params["card"] = json.dumps(card)
        with path.open("rb") as body:
            headers = {"Content-Type": "application/octet-stream"}
            report = self._call("POST", "/models", params=params, content=body, headers=headers)
        return _rebuild(SubmitReport, report)


def _merge(cls: type, reports: list[dict]) -> Any:
    """One report from per-job ones: lists joined in the order given, counts added."""
    merged = cls()
    for report in reports:
        for key, value in report.items():
            if hasattr(merged, key) and not key.startswith("_"):
                setattr(merged, key, getattr(merged, key) + value)
    return merged
