"""Helpers for the HTTP API tests: a client over the ASGI app, accounts, uploads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient

from gauntlet.scheduler import service
from gauntlet.scheduler.api import create_api


def client(app) -> TestClient:
    # Server errors come back as responses (a 500 is then what a test sees and fails
    # on), as they would over the network.
    return TestClient(create_api(app), raise_server_exceptions=False)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def accounts(app) -> dict[str, dict]:
    """Two plain accounts and an admin, as request headers."""
    return {
        "alice": bearer(service.add_user(app, "alice")),
        "bob": bearer(service.add_user(app, "bob")),
        "root": bearer(service.add_user(app, "root", admin=True)),
    }


def upload(http, weights: Path, headers: dict, *, name: str, n: int = 30, **params):
    """POST the file as the body; ``sha256`` is declared unless given (None: omitted)."""
    data = Path(weights).read_bytes()
    query = {"arch": "small-cnn", "dataset": "digits", "name": name, "n": n}
    query["sha256"] = hashlib.sha256(data).hexdigest()
    query.update(params)
    query = {k: v for k, v in query.items() if v is not None}
    return http.post("/api/models", params=query, content=data, headers=headers)
