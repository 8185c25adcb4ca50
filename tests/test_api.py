"""The HTTP API end to end: upload, drain, read the boards, and `gauntlet serve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from gauntlet.scheduler import service
from gauntlet.scheduler.cli import main
from gauntlet.scheduler.executors import LocalExecutor
from tests.api_helpers import accounts, bearer, client, upload
from tests.queue_helpers import free_port
from tests.service_helpers import make_app

N = 60


def _json(rows) -> list[dict]:
    """Rows as the API serialises them (dataclasses to dicts, tuples to lists)."""
    import json

    return json.loads(json.dumps([asdict(r) for r in rows], default=str))


def test_upload_drain_and_boards_match_the_service_layer(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack)
    users = accounts(app)
    http = client(app)
    sent = {}
    for name, path in digits_models.items():
        response = upload(http, path, users["alice"], name=name, n=N)
        assert response.status_code == 201, response.text
        sent[name] = response.json()
        assert sent[name]["new_jobs"] == 4 and sent[name]["public"] is False
    assert app.dispatcher(LocalExecutor()).run(drain=True).done == 8

    # Alice sees her private models' numbers, equal to the service layer's own.
    board = http.get("/api/leaderboard", params={"dataset": "digits"}, headers=users["alice"])
    assert board.status_code == 200
    expected = _json(service.leaderboard(app, dataset="digits"))
    assert board.json() == expected and [e["model"] for e in expected] == ["robust", "standard"]
    for name in ("calibration", "corruption", "transfer", "backdoor", "privacy"):
        got = http.get(f"/api/{name}", headers=users["root"])
        assert got.status_code == 200 and got.json() == _json(service.board(app, name)), name

    # Nobody else does, until she publishes one: then it is ranked first among public ones.
    assert http.get("/api/leaderboard").json() == []
    assert http.get("/api/models", headers=users["bob"]).json() == []
    standard = sent["standard"]["model_id"]
    published = http.post(f"/api/models/{standard}/publish", headers=users["alice"])
    assert published.status_code == 200 and published.json()["public"] is True
    public = http.get("/api/leaderboard").json()
    assert [(e["model"], e["rank"]) for e in public] == [("standard", 1)]
    mine = next(e for e in expected if e["model"] == "standard")
    assert {**mine, "rank": 1} == public[0]
    shown = http.get(f"/api/models/{standard}").json()
    assert (shown["owner"], shown["public"]) == ("alice", True)

    jobs = http.get("/api/jobs", params={"model": "standard"}).json()
    assert len(jobs) == 4 and {j["status"] for j in jobs} == {"done"}
    detail = http.get(f"/api/jobs/{jobs[0]['id']}").json()
    assert detail["id"] == jobs[0]["id"] and detail["metrics"]
    assert http.get("/api/queue").json()["jobs"]["done"] == 8
    assert http.get("/api/queue", headers=users["root"]).json()["dead_letters"] == []
    assert http.get("/api/health").json()["status"] == "ok"


def test_the_cli_manages_users_and_publishes(tmp_path, digits_models):
    env = {"GAUNTLET_HOME": str(tmp_path / "home")}
    runner = CliRunner()
    added = runner.invoke(main, ["users", "add", "carol"], env=env)
    assert added.exit_code == 0, added.output
    token = added.output.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{12}\.[A-Za-z0-9_-]{40,}", token)
    assert runner.invoke(main, ["users", "add", "carol"], env=env).exit_code == 1
    listed = runner.invoke(main, ["users", "list", "--json"], env=env)
    assert '"name": "carol"' in listed.output and token not in listed.output
    app = make_app(tmp_path / "home")
    assert (
        upload(client(app), digits_models["standard"], bearer(token), name="c").status_code == 201
    )
    assert http_models(app) == []
    published = runner.invoke(main, ["publish", "c"], env=env)
    assert published.exit_code == 0 and "is public" in published.output
    assert [m["name"] for m in http_models(app)] == ["c"]
    removed = runner.invoke(main, ["users", "remove", "carol"], env=env)
    assert removed.exit_code == 0 and "1 models" in removed.output
    assert client(app).get("/api/models", headers=bearer(token)).status_code == 401
    assert runner.invoke(main, ["users", "remove", "carol"], env=env).exit_code == 1


def http_models(app) -> list[dict]:
    return client(app).get("/api/models").json()


def _gauntlet(*args, env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gauntlet.scheduler.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def served(tmp_path):
    """A real `gauntlet serve` on a free port, its log in a file, and an admin token."""
    env = {**os.environ, "GAUNTLET_HOME": str(tmp_path / "home")}
    token = _gauntlet("users", "add", "ops", "--admin", env=env).stdout.strip().splitlines()[-1]
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "gauntlet.scheduler.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, "gauntlet serve did not answer in 60 s"
        time.sleep(0.2)
    yield url, token, tmp_path / "serve.log"
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_gauntlet_serve_answers_over_http(served, digits_models):
    url, token, log = served
    assert httpx.get(f"{url}/openapi.json").json()["paths"]["/api/models"]["post"]
    # An upload streamed in chunks, with no length given up front.
    weights = Path(digits_models["standard"]).read_bytes()
    chunks = (weights[i : i + 65536] for i in range(0, len(weights), 65536))
    query = {"arch": "small-cnn", "dataset": "digits", "name": "served", "n": 20}
    sent = httpx.post(f"{url}/api/models", params=query, content=chunks, headers=bearer(token))
    assert sent.status_code == 201, sent.text
    assert sent.json()["bytes"] == len(weights)
    assert httpx.get(f"{url}/api/models").json() == []  # private, even to anonymous readers
    listed = httpx.get(f"{url}/api/models", headers=bearer(token)).json()
    assert [m["name"] for m in listed] == ["served"]
    forged = token[:13] + "x" * (len(token) - 13)
    refused = httpx.post(f"{url}/api/jobs/1/cancel", headers=bearer(forged))
    assert refused.status_code == 401 and forged not in refused.text
    assert httpx.post(f"{url}/api/jobs/1/cancel").status_code == 401
    assert httpx.get(f"{url}/api/jobs/999").status_code == 404
    text = log.read_text()
    assert "POST /api/models" in text  # the access log is there, and holds no token
    assert token not in text and forged not in text and token.split(".")[1] not in text


def test_schemathesis_finds_no_server_error(served):
    """Property-based requests against the served OpenAPI document, with a token."""
    url, token, log = served
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "8",
        "--seed",
        "1",
        "--no-color",
        "--header",
        f"Authorization: Bearer {token}",
    ]
    # In the test's folder: the run keeps its example database where it runs.
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=log.parent)
    print(run.stdout[run.stdout.rfind("SUMMARY") :])  # shown with ``pytest -s``
    assert run.returncode == 0, run.stdout[-4000:]
    assert token not in log.read_text()
