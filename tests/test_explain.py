"""Explanations as a job kind, and the model-randomisation sanity check of the maps."""

from __future__ import annotations

import json
import re

import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import MetricRow
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.cli import main
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.submit import default_input_spec
from gauntlet.scheduler.train import request_job
from gauntlet.workers import explain
from gauntlet.workers.datasets import load_split
from gauntlet.workers.jobs.explain import check
from gauntlet.workers.models import load_classifier
from tests.service_helpers import make_app, submit_digits

CLEAN_ONLY = "n: 20\neps: {linf: {default: 0.2}}\nevaluations:\n  - attack: clean\n"


def _app_with_model(tmp_path, digits_models):
    suite = tmp_path / "suite.yaml"
    suite.write_text(CLEAN_ONLY)
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=str(suite), name="base")
    return app


def test_explain_job_stores_maps_and_grids(tmp_path, digits_models):
    app = _app_with_model(tmp_path, digits_models)
    params = {"eps": 0.2, "lime_samples": 100, "ig_steps": 16}
    job_id, new = request_job(app.engine, app.queue, "base", "explain", "fgsm", params, n=6)
    assert new
    assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0
    job = lifecycle.get_job(app.engine, job_id)
    details = job["details"]
    assert details["methods"] == ["lime", "saliency", "ig"]
    store = ArtifactStore(app.settings.artifacts)
    inputs = explain.load_maps(store.get(details["artifacts"]["inputs"]).read_bytes())
    assert inputs["x"].shape == inputs["x_adv"].shape == (6, 1, 8, 8)
    # FGSM at the digits budget moves every pixel by at most eps.
    assert float((inputs["x_adv"] - inputs["x"]).abs().max()) <= 0.2 + 1e-6
    for method, summary in details["explanations"].items():
        maps = explain.load_maps(store.get(summary["maps"]).read_bytes())
        assert maps["clean"].shape == maps["adversarial"].shape == (6, 1, 8, 8)
        assert torch.isfinite(maps["clean"]).all() and maps["clean"].abs().sum() > 0
        assert store.get(summary["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert summary["mean_abs_clean"] > 0, method
        assert -1 <= summary["rank_correlation"] <= 1
    stmt = sa.select(MetricRow.name).where(MetricRow.job_id == job_id)
    with app.engine.connect() as conn:
        names = set(conn.execute(stmt).scalars())
    assert {"saliency_rank_correlation", "lime_mean_abs_clean", "robust_accuracy"} <= names
    _job_page_shows_the_grids(app, job, store)


def _job_page_shows_the_grids(app, job, store):
    """The web job page embeds each method's grid, served only to who may see the model."""
    import hashlib

    from fastapi.testclient import TestClient

    from gauntlet.db.schema import Model
    from gauntlet.scheduler import api as api_package

    client = TestClient(api_package.create_api(app))
    page = client.get(f"/jobs/{job['id']}").text
    sources = re.findall(r'<img src="(/jobs/\d+/images/[a-z_]+\.png)"', page)
    assert sources == [f"/jobs/{job['id']}/images/{m}_grid.png" for m in ("lime", "saliency", "ig")]
    for source, method in zip(sources, ("lime", "saliency", "ig"), strict=True):
        response = client.get(source)
        assert response.headers["content-type"] == "image/png"
        expected = job["details"]["explanations"][method]["grid"]
        assert hashlib.sha256(response.content).hexdigest() == expected
    # Names the details do not list are not served, whatever the store holds.
    assert client.get(f"/jobs/{job['id']}/images/inputs.png").status_code == 404
    with app.engine.begin() as conn:
        conn.execute(sa.update(Model).where(Model.id == job["model_id"]).values(public=False))
    assert client.get(sources[0]).status_code == 404


def test_cli_requests_an_explain_job_and_shows_its_artifacts(tmp_path, digits_models):
    app = _app_with_model(tmp_path, digits_models)
    runner = CliRunner()
    env = {"GAUNTLET_HOME": str(tmp_path / "home")}

    def invoke(*args):
        return runner.invoke(main, list(map(str, args)), env=env, catch_exceptions=False)

    queued = invoke("explain", "base", "--n", 4, "--method", "saliency", "--method", "ig")
    assert queued.exit_code == 0, queued.output
    assert "explain job" in queued.output
    # The same request is the same job, whatever the order of --method.
    again = invoke("explain", "base", "--n", 4, "--method", "ig", "--method", "saliency")
    assert "already requested" in again.output
    assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0
    (job,) = [j for j in lifecycle.list_jobs(app.engine) if j["kind"] == "explain"]
    shown = json.loads(invoke("job", job["id"], "--json").output)
    # The request resolved the quick suite's digits budget.
    assert shown["spec"]["params"]["eps"] == pytest.approx(0.2)
    artifacts = shown["details"]["artifacts"]
    assert set(artifacts) == {"inputs", "saliency_maps", "saliency_grid", "ig_maps", "ig_grid"}
    table = invoke("job", job["id"]).output
    assert "artifacts" in table and "saliency_grid" in table


def test_bad_settings_are_refused_at_request_time(tmp_path, digits_models):
    app = _app_with_model(tmp_path, digits_models)
    with pytest.raises(GauntletError, match="explanation attack"):
        request_job(app.engine, app.queue, "base", "explain", "cw", {"eps": 0.2})
    with pytest.raises(GauntletError, match="methods"):
        request_job(
            app.engine, app.queue, "base", "explain", "fgsm", {"eps": 0.2, "methods": ["x"]}
        )
    with pytest.raises(GauntletError, match="eps"):
        request_job(app.engine, app.queue, "base", "explain", "fgsm", {})
    assert check("pgd", {"eps": 0.1, "methods": "ig"})["methods"] == ["ig"]


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with fresh random weights (Adebayo et al.'s cascade, all at once)."""
    torch.manual_seed(123)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def test_saliency_passes_the_model_randomisation_check(digits_models):
    spec = default_input_spec("digits")
    trained = load_classifier(digits_models["standard"], "small-cnn", spec)
    random = _randomised(load_classifier(digits_models["standard"], "small-cnn", spec))
    x, y = load_split("digits", "test", None)
    # Two points of each of four classes, so the maps can be compared across classes.
    picks = torch.cat([torch.nonzero(y == c)[:2, 0] for c in (0, 1, 4, 7)])
    x, y = x[picks], y[picks]
    pred = explain.predictions(trained, x)
    assert (pred == y).float().mean() >= 0.75
    trained_maps = explain.attribute(trained, x, pred, "saliency")
    random_maps = explain.attribute(random, x, pred, "saliency")
    # A saliency method that only showed edges of the input would survive randomisation.
    against_random = explain.rank_correlation(trained_maps, random_maps)
    assert float(against_random.mean()) < 0.5, against_random
    # And it depends on the class: a 0's map is not a 1's.
    same = explain.rank_correlation(trained_maps[0::2], trained_maps[1::2]).mean()
    other = explain.rank_correlation(trained_maps[0::2], trained_maps[1::2].roll(1, 0)).mean()
    assert float(other) < float(same), (same, other)
    assert float(other) < 0.5
