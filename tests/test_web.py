"""The web leaderboard in a real browser: real jobs, a live server, headless chromium.

The models are the digits CNNs, submitted and drained through the service layer like
the service tests do; the pages are then loaded as a visitor would load them, and
the numbers they show are checked against the service layer's own.
"""

from __future__ import annotations

import re
import shutil
import threading
import time

import fastapi
import pytest
import uvicorn
from playwright import sync_api

from gauntlet.scheduler import service
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.web import install
from tests.queue_helpers import free_port, missing
from tests.service_helpers import make_app, submit_digits

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

SUITE = """\
n: 60
seed: 0
eps: {linf: {default: 0.2}}
evaluations:
  - attack: clean
  - attack: fgsm
    norm: linf
  - attack: pgd
    norm: linf
    params: {steps: 5}
    eps_sweep: [0.25, 0.5, 2]
  - attack: autoattack
    norm: linf
    params: {version: standard, steps: 5, queries: 40, n_target_classes: 2}
  - attack: pgd
    kind: calibration
    norm: linf
    params: {steps: 5}
  - attack: clean
    kind: corruption
transfer: {attack: pgd, norm: linf, params: {steps: 5}}
"""

PLOTS = (
    "plot-robustness",
    "plot-reliability",
    "plot-corruption",
    "plot-autoattack",
    "plot-transfer",
)


class _Server:
    """uvicorn serving ``api`` on a free port in a thread, for the length of a test."""

    def __init__(self, api):
        self.port = free_port()
        config = uvicorn.Config(api, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _serve(app):
    api = fastapi.FastAPI()
    install(api, app)
    return _Server(api)


def _box(page, selector: str) -> dict:
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not rendered"
    return box


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


@pytest.fixture
def browser():
    if not shutil.which(CHROMIUM):
        missing("chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


def test_pages_in_a_browser(tmp_path, digits_models, browser):
    suite = tmp_path / "web.yaml"
    suite.write_text(SUITE)
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=str(suite), name="standard")
    # A name with markup in it: it must show literally, never as markup.
    odd = "robust <i>AT</i> & co"
    submit_digits(app, digits_models["robust"], suite=str(suite), name=odd)
    # A model the service trains from "standard": its page shows where it came from.
    small = tmp_path / "small.yaml"
    small.write_text(
        "n: 60\neps: {linf: {default: 0.2}}\nevaluations:\n  - attack: clean\n"
        "  - {attack: fgsm, norm: linf}\n"
    )
    params = {"eps": 0.2, "epochs": 2, "pgd_steps": 2, "suite": str(small)}
    train_job, _ = service.request_training(app, "standard", "pgd-at", params)
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert stats.failed == 0
    entries = service.leaderboard(app, dataset="digits")
    assert {e.model for e in entries} == {"standard", odd, "standard+pgd-at"}
    shots = tmp_path / "screenshots"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    with _serve(app) as base:
        # The leaderboard: one row per entry, numbers as the service layer computes them.
        assert page.goto(base + "/").status == 200
        page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
        rows = page.locator("table.leaderboard tbody tr")
        assert rows.count() == len(entries)
        for i, entry in enumerate(entries):
            cells = rows.nth(i).locator("td").all_inner_texts()
            assert cells[0] == str(entry.rank)
            assert cells[1] == entry.model
            assert cells[2].startswith(_pct(entry.clean_accuracy))
            robust = f"{_pct(entry.robust_accuracy)} ({100 * entry.robust_low:.1f}"
            assert cells[3].startswith(robust)
            assert cells[4] == str(entry.n)
            assert cells[5] == (entry.strongest_attack or "\u2014")
            assert cells[7] == "small-cnn" and cells[8] == "\u2014"
        assert page.locator("i").count() == 0  # the odd name's markup was escaped

        # Sorting by links, within each table: by model name, ascending, then descending.
        def names() -> list[list[str]]:
            tables = page.locator("table.leaderboard").all()
            return [t.locator("tbody tr td:nth-child(2)").all_inner_texts() for t in tables]

        assert len(names()) == 2  # 60 points for the submissions, 200 for the trained one
        with page.expect_navigation():
            page.get_by_role("link", name="Model").first.click()
        assert "sort=model&order=asc" in page.url
        assert all(n == sorted(n, key=str.lower) for n in names())
        assert sum(len(n) for n in names()) == len(entries)
        with page.expect_navigation():
            page.get_by_role("link", name=re.compile("^Model")).first.click()
        assert "order=desc" in page.url
        assert all(n == sorted(n, key=str.lower, reverse=True) for n in names())
        # The model page, reached by its link.
        page.goto(base + "/")
        with page.expect_navigation():
            page.get_by_role("link", name="standard", exact=True).click()
        assert "/models/" in page.url
        standard = next(e for e in entries if e.model == "standard")
        measured = page.locator("#model-entries tbody tr td").all_inner_texts()
        assert measured[3] == _pct(standard.clean_accuracy)
        assert measured[4] == _pct(standard.robust_accuracy)
        assert measured[6] == str(standard.n)
        for plot in PLOTS:
            box = _box(page, f"svg#{plot}")
            assert box["width"] > 0 and box["height"] > 0, plot
            assert page.locator(f"svg#{plot}").get_attribute("aria-label")
        page.screenshot(path=str(shots / "model.png"), full_page=True)
        # Every job of the model is a row, with every stored metric.
        jobs = service.list_jobs(app, model=standard.model_id)
        assert page.locator("#jobs-table tbody tr").count() == len(jobs)
        detail = service.job_detail(app, max(j["id"] for j in jobs if j["kind"] == "eval"))
        text = page.locator("#jobs-table").inner_text()
        for metric in detail["metrics"]:
            assert metric["name"] in text
        # A job page: its metrics as stored, and no refresh once it is done.
        page.goto(f"{base}/jobs/{detail['id']}")
        assert page.locator("#job-status").inner_text() == "done"
        shown = dict(
            row.locator("td").all_inner_texts()[:2]
            for row in page.locator("#job-metrics tbody tr").all()
        )
        for metric in detail["metrics"]:
            assert shown[metric["name"]] == f"{metric['value']:.4g}"
        assert page.locator('meta[http-equiv="refresh"]').count() == 0
        page.screenshot(path=str(shots / "job.png"), full_page=True)
        # The boards.
        for name in ("calibration", "corruption", "transfer", "backdoor", "privacy"):
            assert page.goto(f"{base}/boards/{name}").status == 200, name
            page.screenshot(path=str(shots / f"board-{name}.png"), full_page=True)
            if name in ("calibration", "corruption"):
                assert page.locator(f"#{name} tbody tr").count() == 2
        page.goto(f"{base}/boards/transfer")
        assert _box(page, "svg#heatmap-digits-linf-0-2")["width"] > 0
        calibration = service.calibration(app, dataset="digits")
        page.goto(f"{base}/boards/calibration")
        assert page.get_by_text(f"{calibration[0].metrics['ece']:.4g}").count() >= 1
        # The derived model's page names its parent and the train job that made it.
        page.goto(base + "/")
        with page.expect_navigation():
            page.get_by_role("link", name="standard+pgd-at").click()
        origin = page.locator("#card dd", has=page.get_by_role("link", name="train job"))
        assert origin.inner_text() == "standard by pgd-at (train job)"
        assert origin.get_by_role("link", name="train job").get_attribute("href") == (
            f"/jobs/{train_job}"
        )
        page.screenshot(path=str(shots / "derived.png"), full_page=True)
        # Bad input is a 400 page, unknown ids a 404 page: never a 500.
        for path, status in (
            ("/?sort=nonsense", 400),
            ("/?order=sideways", 400),
            ("/jobs/abc", 400),
            ("/jobs/999999", 404),
            ("/models/nope", 404),
            ("/leaderboard/nope/linf", 404),
            ("/boards/nope", 404),
        ):
            response = page.goto(base + path)
            assert response.status == status, path
            assert page.locator("h1").inner_text() in ("Bad request", "Not found")
    page.close()
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        ["leaderboard.png", "model.png", "job.png", "derived.png"]
        + [
            f"board-{n}.png"
            for n in ("calibration", "corruption", "transfer", "backdoor", "privacy")
        ]
    )
