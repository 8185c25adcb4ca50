"""Training-time defenses as jobs: derived models with lineage, evaluated like submissions."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from gauntlet.db.schema import MetricRow
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.train import request_training
from tests.service_helpers import make_app, submit_digits


def _robust_accuracy(engine, job_id: int) -> float:
    stmt = sa.select(MetricRow.value).where(
        MetricRow.job_id == job_id, MetricRow.name == "robust_accuracy"
    )
    with engine.connect() as conn:
        return conn.execute(stmt).scalar_one()


def _suite(tmp_path, text: str) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return str(path)


def _pgd_suite(tmp_path, n: int) -> str:
    """Clean accuracy and 10-step PGD at the digits budget, on ``n`` points."""
    return _suite(
        tmp_path,
        f"n: {n}\neps: {{linf: {{default: 0.2}}}}\nevaluations:\n"
        "  - attack: clean\n  - {attack: pgd, norm: linf, params: {steps: 10}}\n",
    )


def test_pgd_adversarial_training_raises_robust_accuracy(tmp_path, digits_models):
    suite = _pgd_suite(tmp_path, 150)
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=suite, name="base")
    params = {"eps": 0.2, "epochs": 8, "pgd_steps": 3, "suite": suite}
    job_id, new = request_training(app.engine, app.queue, "base", "pgd-at", params, n=150)
    # The same request again is the same job: nothing new is queued.
    again = request_training(app.engine, app.queue, "base", "pgd-at", params, n=150)
    assert new and again == (0, False)
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert stats.failed == 0
    # Training reported its progress per epoch to Redis.
    progress = app.redis.hgetall(f"{app.settings.redis_prefix}:progress:{job_id}")
    assert progress == {"done": "8", "total": "8"}
    derived = [m for m in lifecycle.list_models(app.engine) if m["parent_id"]]
    assert [m["name"] for m in derived] == ["base+pgd-at"]
    board = {e.model: e for e in leaderboard(app.engine)}
    base, trained = board["base"], board["base+pgd-at"]
    assert trained.robust_accuracy > base.robust_accuracy + 0.2
    assert trained.clean_accuracy > base.clean_accuracy - 0.1  # a small cost at most


def test_defensive_distillation_resists_fgsm_but_not_cw(tmp_path, digits_models):
    suite = _suite(
        tmp_path,
        "n: 100\neps: {l2: {default: 1.5}}\nevaluations:\n"
        "  - attack: clean\n  - {attack: fgsm, norm: l2}\n"
        "  - {attack: cw-l2, norm: l2, params: {steps: 100, binary_steps: 4, "
        "initial_const: 0.1, lr: 0.1}}\n",
    )
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=suite, name="base")
    request_training(
        app.engine,
        app.queue,
        "base",
        "distillation",
        {"temperature": 100, "epochs": 15, "suite": suite},
        n=100,
    )
    app.dispatcher(LocalExecutor()).run(drain=True)
    robust = {
        job["attack"]: _robust_accuracy(app.engine, job["id"])
        for job in lifecycle.list_jobs(app.engine, model="base+distillation")
        if job["attack"] in ("fgsm", "cw-l2")
    }
    # The saturated softmax hides the gradient from FGSM; CW works on the logits.
    assert robust["fgsm"] > 0.6
    assert robust["cw-l2"] < robust["fgsm"] - 0.3


def test_unknown_training_method_is_refused(tmp_path, digits_models):
    from gauntlet.cluster.errors import GauntletError

    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], name="base", n=20)
    with pytest.raises(GauntletError, match="Unknown training method"):
        request_training(app.engine, app.queue, "base", "magic", {})
    with pytest.raises(GauntletError, match="no model match"):
        request_training(app.engine, app.queue, "nobody", "pgd-at", {})


def test_ensemble_adversarial_training_uses_static_models(tmp_path, digits_models):
    suite = _pgd_suite(tmp_path, 100)
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=suite, name="base")
    static = submit_digits(app, digits_models["robust"], suite=suite, name="static")
    params = {"eps": 0.2, "epochs": 4, "suite": suite, "static_models": [static.model_id]}
    _, new = request_training(app.engine, app.queue, "base", "ensemble-at", params, n=100)
    assert new
    assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0
    board = {e.model: e for e in leaderboard(app.engine)}
    assert board["base+ensemble-at"].robust_accuracy > board["base"].robust_accuracy + 0.1
    from gauntlet.cluster.errors import GauntletError

    with pytest.raises(GauntletError, match="static_models"):
        request_training(app.engine, app.queue, "base", "ensemble-at", {"eps": 0.2})
