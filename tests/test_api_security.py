"""The API's walls: tokens, private models, the upload cap, checksums, quotas, logs."""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta

import pytest
import sqlalchemy as sa

from gauntlet.db.schema import Job, Model, Token, utcnow
from gauntlet.scheduler import service
from tests.api_helpers import accounts, bearer, client, upload
from tests.service_helpers import make_app

WRITES = ["/api/models", "/api/models/abc/publish", "/api/jobs/1/cancel", "/api/jobs/1/rerun"]


@pytest.fixture
def app(tmp_path, stack):
    return make_app(tmp_path / "home", **stack)


def _rows(app, table) -> int:
    with app.engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(table))


def _store_files(app) -> list:
    roots = (app.settings.artifacts, app.settings.home / "uploads")
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_every_write_needs_a_valid_token(app):
    http = client(app)
    token = service.add_user(app, "alice")
    prefix = token.split(".")[0]
    for path in WRITES:
        for headers in (
            {},
            bearer("nonsense"),
            bearer(f"{prefix}.wrong"),
            {"Authorization": token},
        ):
            response = http.post(path, headers=headers)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert token not in response.text and "wrong" not in response.text
    # A bad token is refused on reads too, rather than quietly read as anonymous.
    assert http.get("/api/models", headers=bearer("nonsense")).status_code == 401
    assert http.get("/api/models").status_code == 200
    # Only the hash is stored; the prefix finds it.
    with app.engine.connect() as conn:
        stored = conn.execute(sa.select(Token.prefix, Token.hash)).one()
    assert stored == (prefix, hashlib.sha256(token.encode()).hexdigest())


def test_a_private_model_is_invisible_to_other_accounts(app, digits_models):
    http = client(app)
    users = accounts(app)
    sent = upload(http, digits_models["standard"], users["alice"], name="mine")
    assert sent.status_code == 201
    model = sent.json()["model_id"]
    job = http.get("/api/jobs", headers=users["alice"]).json()[0]["id"]

    # To bob (and to anonymous readers) it does not exist: 404, never 403.
    for headers in (users["bob"], {}):
        assert http.get(f"/api/models/{model}", headers=headers).status_code == 404
        assert http.get(f"/api/jobs/{job}", headers=headers).status_code == 404
        assert http.get("/api/jobs", headers=headers).json() == []
        assert http.get("/api/models", headers=headers).json() == []
    for path in (
        f"/api/models/{model}/publish",
        f"/api/jobs/{job}/cancel",
        f"/api/jobs/{job}/rerun",
    ):
        refused = http.post(path, headers=users["bob"])
        assert refused.status_code == 404 and "mine" not in refused.text, path
    assert {j["status"] for j in service.list_jobs(app)} == {"queued"}
    if any(getattr(r, "path", None) == "/models/{model_id}" for r in http.app.routes):
        # The web pages, when installed, take the same token and hide the same model.
        assert http.get(f"/models/{model}", headers=users["bob"]).status_code == 404
        assert http.get(f"/models/{model}", headers=users["alice"]).status_code == 200
    # Nor can bob add jobs to it by submitting the same weights himself.
    again = upload(http, digits_models["standard"], users["bob"], name="copy")
    assert again.status_code == 409 and _rows(app, Model) == 1

    # Its owner and admins see it; once published everyone does, but only its owner
    # and admins may still operate it.
    assert http.get(f"/api/models/{model}", headers=users["root"]).status_code == 200
    assert http.post(f"/api/models/{model}/publish", headers=users["alice"]).status_code == 200
    assert http.get(f"/api/models/{model}").json()["public"] is True
    assert http.get(f"/api/jobs/{job}", headers=users["bob"]).status_code == 200
    assert http.post(f"/api/jobs/{job}/cancel", headers=users["bob"]).status_code == 403
    cancelled = http.post(f"/api/jobs/{job}/cancel", headers=users["alice"])
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"] == [job]
    rerun = http.post(f"/api/jobs/{job}/rerun", headers=users["root"])
    assert rerun.status_code == 200 and rerun.json()["rerun"][0]["id"] == job


def test_an_upload_over_the_cap_is_413_and_leaves_nothing(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", GAUNTLET_MAX_WEIGHTS_BYTES=100_000, **stack)
    http = client(app)
    headers = bearer(service.add_user(app, "alice"))
    weights = digits_models["standard"].read_bytes()
    assert len(weights) > 100_000
    query = {"arch": "small-cnn", "dataset": "digits"}
    declared = http.post("/api/models", params=query, content=weights, headers=headers)
    # No length given: the stream itself is cut off once it crosses the cap.
    chunks = (weights[i : i + 8192] for i in range(0, len(weights), 8192))
    streamed = http.post("/api/models", params=query, content=chunks, headers=headers)
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert "GAUNTLET_MAX_WEIGHTS_BYTES" in response.json()["detail"]
    assert _store_files(app) == [] and _rows(app, Model) == 0 and _rows(app, Job) == 0


def test_a_checksum_mismatch_is_400_and_leaves_nothing(app, digits_models):
    http = client(app)
    headers = bearer(service.add_user(app, "alice"))
    response = upload(http, digits_models["standard"], headers, name="x", sha256="0" * 64)
    assert response.status_code == 400 and "sha256" in response.json()["detail"]
    assert _store_files(app) == [] and _rows(app, Model) == 0
    # Bad weights are a 400 too, without the server's spool path in the message.
    bad = http.post(
        "/api/models",
        params={"arch": "small-cnn", "dataset": "digits"},
        content=b"\0" * 64,
        headers=headers,
    )
    assert bad.status_code == 400 and str(app.settings.home) not in bad.text
    assert _store_files(app) == []


def test_quotas_answer_429_naming_the_quota(tmp_path, digits_models, stack):
    app = make_app(
        tmp_path / "home",
        GAUNTLET_QUOTA_SUBMISSIONS_PER_DAY=1,
        GAUNTLET_QUOTA_GPU_HOURS_PER_MONTH=1.5,
        **stack,
    )
    http = client(app)
    users = accounts(app)
    assert upload(http, digits_models["standard"], users["alice"], name="a").status_code == 201
    refused = upload(http, digits_models["robust"], users["alice"], name="b")
    assert refused.status_code == 429
    assert "GAUNTLET_QUOTA_SUBMISSIONS_PER_DAY" in refused.json()["detail"]
    assert upload(http, digits_models["robust"], users["root"], name="b").status_code == 201

    # Two of alice's jobs ran for an hour each on one GPU: 2 GPU-hours, past the 1.5.
    now = utcnow()
    job_ids = [j["id"] for j in http.get("/api/jobs", headers=users["alice"]).json()]
    with app.engine.begin() as conn:
        for job_id in job_ids[:2]:
            spec = conn.scalar(sa.select(Job.spec).where(Job.id == job_id))
            spec = {**spec, "resources": {"num_gpus": 1.0, "memory_mb": None}}
            conn.execute(
                sa.update(Job)
                .where(Job.id == job_id)
                .values(spec=spec, started_at=now - timedelta(hours=1), finished_at=now)
            )
    usage = http.get("/api/me", headers=users["alice"]).json()
    assert usage["gpu_hours_this_month"] == pytest.approx(2.0, abs=1e-3)
    rerun = http.post(f"/api/jobs/{job_ids[0]}/rerun", headers=users["alice"])
    assert rerun.status_code == 429 and "GAUNTLET_QUOTA_GPU_HOURS_PER_MONTH" in rerun.text
    assert "GPU-hour quota" in rerun.json()["detail"]


def test_tokens_never_reach_a_log_line(app, caplog):
    http = client(app)
    token = service.add_user(app, "alice")
    forged = token.split(".")[0] + ".forged-secret-value"
    caplog.set_level(logging.DEBUG)
    for headers in (bearer(token), bearer(forged), bearer("garbage"), {"Authorization": token}):
        http.get("/api/models", headers=headers)
        http.post("/api/jobs/1/cancel", headers=headers)
        http.post("/api/models", params={"arch": "nope", "dataset": "nope"}, headers=headers)
    lines = [record.getMessage() for record in caplog.records] + [caplog.text]
    for secret in (token, token.split(".")[1], "forged-secret-value"):
        assert not [line for line in lines if secret in line]


def test_errors_are_json_and_never_500(app):
    http = client(app)
    headers = bearer(service.add_user(app, "alice"))
    checks = [
        (http.get("/api/jobs/0"), 422),
        (http.get("/api/jobs/123456"), 404),
        (http.get("/api/jobs", params={"status": "weird"}), 422),
        (http.get("/api/models/none"), 404),
        (
            http.post(
                "/api/models",
                params={"arch": "x", "dataset": "digits"},
                headers=headers,
                content=b"x" * 10,
            ),
            400,
        ),
        (http.post("/api/models", params={"dataset": "digits"}, headers=headers), 422),
        (http.post("/api/jobs/5/rerun", headers=headers), 404),
        (http.get("/api/leaderboard", params={"dataset": "nope"}), 200),
    ]
    for response, status in checks:
        assert response.status_code == status, response.text
        assert "detail" in response.json() or status == 200


def test_models_from_the_cli_stay_public_and_unowned(app, digits_models):
    from tests.service_helpers import submit_digits

    submit_digits(app, digits_models["standard"], name="cli", n=30)
    http = client(app)
    users = accounts(app)
    assert [m["name"] for m in http.get("/api/models").json()] == ["cli"]
    again = upload(http, digits_models["standard"], users["alice"], name="cli", n=30)
    assert again.status_code == 201
    assert (again.json()["public"], again.json()["owner"], again.json()["new_jobs"]) == (
        True,
        None,
        0,
    )
    # Everyone sees it; only admins operate it, since no account owns it.
    job = http.get("/api/jobs").json()[0]["id"]
    assert http.post(f"/api/jobs/{job}/cancel", headers=users["alice"]).status_code == 403
    assert http.post(f"/api/jobs/{job}/cancel", headers=users["root"]).status_code == 200
