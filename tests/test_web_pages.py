"""The web pages without a browser: visibility, ranks, a running job, plots, cards.

Requests go through FastAPI's test client; the browser tests are in test_web.py.
"""

from __future__ import annotations

import re

import fastapi

from gauntlet.scheduler import service
from gauntlet.scheduler.web import install
from tests.service_helpers import add_model, make_app


def test_private_models_are_hidden_from_anonymous_viewers(tmp_path):
    """Through the API's app factory: a private model is a 404 to anyone but its owner."""
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from gauntlet.db.schema import Model
    from gauntlet.scheduler import api as api_package

    app = make_app(tmp_path / "home")
    token = service.add_user(app, "alice")
    (alice,) = [u for u in service.list_users(app) if u["name"] == "alice"]
    add_model(app.engine, "p" * 64, "shown")
    add_model(app.engine, "q" * 64, "hidden")
    with app.engine.begin() as conn:
        conn.execute(
            sa.update(Model).where(Model.id == "q" * 64).values(public=False, owner_id=alice["id"])
        )
    client = TestClient(api_package.create_api(app))
    assert client.get("/models/" + "p" * 64).status_code == 200
    assert client.get("/models/" + "q" * 64).status_code == 404
    owner = {"Authorization": f"Bearer {token}"}
    response = client.get("/models/" + "q" * 64, headers=owner)
    assert response.status_code == 200
    assert "<dt>Submitter</dt><dd>alice</dd>" in response.text


def test_hidden_entries_leave_no_gap_in_the_ranks():
    from gauntlet.scheduler.boards.leaderboard import Entry
    from gauntlet.scheduler.web.boards import leaderboard_html

    def entry(rank, name, robust):
        return Entry(
            rank,
            name,
            name,
            "cnn",
            "digits",
            "linf",
            0.2,
            "s",
            0.9,
            robust,
            50,
            robust - 0.1,
            robust + 0.1,
            ["pgd"],
            "pgd",
        )

    entries = [entry(1, "secret", 0.6), entry(2, "a", 0.5), entry(3, "b", 0.4)]
    page = leaderboard_html(entries, {"a": {}, "b": {}}, "rank", "asc", "/")
    assert "secret" not in page
    ranks = re.findall(r"<tr><td class=num>(\d+)</td>", page)
    assert ranks == ["1", "2"]


def test_a_running_job_page_shows_progress_and_refreshes(tmp_path):
    from fastapi.testclient import TestClient

    from gauntlet.scheduler import lifecycle
    from gauntlet.scheduler.queue import progress_key

    app = make_app(tmp_path / "home")
    add_model(app.engine, "r" * 64, "runner")
    spec = {"attack": "pgd", "norm": "linf", "eps": 0.2}
    job = lifecycle.NewJob(
        "k", "r" * 64, "eval", "quick", spec, "digits", "pgd", "linf", 0.2, "digits:test:10:0"
    )
    (job_id,) = lifecycle.insert_jobs(app.engine, [job])
    api = fastapi.FastAPI()
    install(api, app)
    client = TestClient(api)
    queued = client.get(f"/jobs/{job_id}").text
    assert '<meta http-equiv="refresh" content="2">' in queued
    assert lifecycle.claim(app.engine, job_id, "test", 60)
    app.redis.hset(
        progress_key(app.settings.redis_prefix, job_id), mapping={"done": 3, "total": 10}
    )
    running = client.get(f"/jobs/{job_id}").text
    assert '<meta http-equiv="refresh" content="2">' in running
    assert '<progress value="3" max="10">' in running and "3 of 10 points" in running
    assert "left</p>" in running


def test_backdoor_and_privacy_plots_are_labelled_svg_and_absent_without_data():
    from gauntlet.scheduler.boards.tracks import TrackRow
    from gauntlet.scheduler.web import plots

    backdoor = TrackRow(
        1,
        "m",
        "m",
        "digits",
        "finetune",
        {},
        100,
        {
            "backdoored_attack_success_rate": 0.9,
            "attack_success_rate": 0.2,
            "backdoored_clean_accuracy": 0.95,
            "clean_accuracy": 0.93,
        },
    )
    pate = TrackRow(
        2,
        "m",
        "m",
        "digits",
        "gnmax",
        {},
        100,
        {"student_accuracy": 0.8, "student_attack_success_rate": 0.1, "eps": 2.0},
    )
    for draw, row, plot_id in (
        (plots.backdoor, backdoor, "plot-backdoor"),
        (plots.privacy, pate, "plot-privacy"),
    ):
        assert draw([]) is None
        svg = draw([row])
        assert svg.startswith(f'<svg id="{plot_id}" role="img" aria-label="')
        assert "Rate (%)" in svg and "Configuration" in svg  # text stays text


def test_a_card_shows_claimed_numbers_and_only_http_links(tmp_path):
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from gauntlet.db.schema import Model

    app = make_app(tmp_path / "home")
    card = {
        "authors": "A. <Author>",
        "venue": "ICML 2099",
        "clean_acc": "91.50",
        "reported": 55.0,
        "link": "javascript:alert(1)",
    }
    add_model(app.engine, "c" * 64, "carded")
    with app.engine.begin() as conn:
        conn.execute(sa.update(Model).where(Model.id == "c" * 64).values(card=card))
    api = fastapi.FastAPI()
    install(api, app)
    text = TestClient(api).get("/models/" + "c" * 64).text
    assert "<dd>A. &lt;Author&gt;</dd>" in text and "ICML 2099" in text
    assert 'href="javascript' not in text and "javascript:alert(1)" in text
    claims = re.search(r'<table id="claims".*?</table>', text).group(0)
    assert "91.5%" in claims and "55.0%" in claims  # no measurement yet: a dash beside each
