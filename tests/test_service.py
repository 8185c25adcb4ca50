"""End to end: submit -> queue -> scheduler -> SQL leaderboard, on real services."""

from __future__ import annotations

import pytest
import torch

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.scheduler.executors import LocalExecutor, RayExecutor
from gauntlet.scheduler.nightly import nightly
from gauntlet.workers.datasets import eval_subset
from gauntlet.workers.models import InputSpec, load_classifier
from tests.service_helpers import add_model, make_app, submit_digits

N = 100


def _clean_accuracy(path, x, y) -> float:
    model = load_classifier(path, "small-cnn", InputSpec(1, 8, 8, 10))
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _drain(app, executor, **kw):
    return app.dispatcher(executor, **kw).run(drain=True)


@pytest.mark.ray
def test_submit_drain_on_ray_and_leaderboard(tmp_path, digits_models, ray_local, stack):
    app = make_app(tmp_path / "home", **stack)
    reports = {
        name: submit_digits(app, path, name=name, n=N) for name, path in digits_models.items()
    }
    # quick: clean, FGSM, PGD and a calibration job
    assert all(r.new_jobs == 4 and r.enqueued == 4 for r in reports.values())

    stats = _drain(app, RayExecutor(), max_in_flight=2)
    assert (stats.done, stats.failed) == (8, 0)
    rows = lifecycle.list_jobs(app.engine)
    assert {str(getattr(r["status"], "value", r["status"])) for r in rows} == {"done"}
    assert all(r["attempts"] == 1 and r["worker_host"] for r in rows)
    # Workers published their progress to Redis (the embedded server, over its socket).
    prefix = app.settings.redis_prefix
    for r in rows:
        assert app.redis.hgetall(f"{prefix}:progress:{r['id']}") == {"done": "100", "total": "100"}

    entries = leaderboard(app.engine, dataset="digits")
    assert [e.model for e in entries] == ["robust", "standard"]  # robust training wins
    x, y, _ = eval_subset("digits", N, 0, app.settings.data_root)
    for entry in entries:
        # Clean accuracy is what an independent forward pass gives on the same subset.
        assert entry.clean_accuracy == pytest.approx(
            _clean_accuracy(digits_models[entry.model], x, y)
        )
        assert entry.n == N and entry.norm == "linf" and entry.eps == pytest.approx(0.2)
        assert entry.robust_accuracy <= entry.clean_accuracy
        assert entry.robust_low <= entry.robust_accuracy <= entry.robust_high
        assert set(entry.attacks) == {"fgsm", "pgd"}
    standard = next(e for e in entries if e.model == "standard")
    robust = next(e for e in entries if e.model == "robust")
    # At eps 0.2 the standard model is nearly always broken; FGSM-AT keeps a good share.
    assert (
        standard.robust_accuracy < 0.1 and robust.robust_accuracy > standard.robust_accuracy + 0.15
    )

    # Submitting again creates nothing: no model, no jobs, no stream entries, no results.
    again = submit_digits(
        app,
        digits_models["robust"],
        suite="quick",
        name="robust",
        n=N,
    )
    assert (again.new_model, again.new_jobs, again.enqueued) == (False, 0, 0)
    assert len(lifecycle.list_jobs(app.engine)) == 8
    assert app.queue.is_empty()
    assert leaderboard(app.engine, dataset="digits") == entries


@pytest.mark.ray
def test_fractional_gpus_are_placed_and_oversized_jobs_fail(tmp_path, digits_models, ray_local):
    suite = tmp_path / "gpu.yaml"
    suite.write_text(
        "n: 50\nresources: {num_gpus: 0.5}\neps: {linf: {default: 0.1}}\n"
        "evaluations:\n  - attack: clean\n  - attack: fgsm\n    norm: linf\n"
    )
    big = tmp_path / "big.yaml"
    big.write_text("n: 50\nresources: {num_gpus: 2}\nevaluations:\n  - attack: clean\n")
    app = make_app(tmp_path / "home")
    submit_digits(
        app,
        digits_models["standard"],
        suite=str(suite),
    )
    submit_digits(
        app,
        digits_models["robust"],
        suite=str(big),
    )
    _drain(app, RayExecutor())
    rows = {r["id"]: r for r in lifecycle.list_jobs(app.engine)}
    placed = [r for r in rows.values() if r["suite"] == str(suite)]
    assert len(placed) == 2 and all(r["device"] == "cpu (ray gpu 0)" for r in placed)
    (oversized,) = [r for r in rows.values() if r["suite"] == str(big)]
    assert str(getattr(oversized["status"], "value", oversized["status"])) == "failed"
    assert "asks for 2 GPUs but the largest node has 1" in oversized["error"]


def test_bad_inputs_fail_their_job_and_the_rest_finish(tmp_path, digits_models):
    app = make_app(tmp_path / "home")
    good = submit_digits(
        app,
        digits_models["standard"],
        suite="quick",
        name="good",
        n=40,
    )
    # Weights of a 10-class net declared as a 3-class model: the model and data disagree.
    submit_digits(
        app,
        digits_models["standard"],
        suite="quick",
        name="wrong-classes",
        n=40,
        input_overrides={"num_classes": 3},
    )
    # The stored file rots after submission: the store's hash check catches it.
    corrupt_src = tmp_path / "corrupt.safetensors"
    corrupt_src.write_bytes(digits_models["robust"].read_bytes())
    corrupt = submit_digits(
        app,
        corrupt_src,
        suite="quick",
        name="corrupt",
        n=40,
    )
    sha = next(m for m in lifecycle.list_models(app.engine) if m["id"] == corrupt.model_id)[
        "weights_sha256"
    ]
    stored = ArtifactStore(app.settings.artifacts).root / sha[:2] / sha
    stored.write_bytes(stored.read_bytes()[:-100] + b"\0" * 100)
    # A model row whose architecture this version does not know (e.g. since removed).
    good_sha = next(m for m in lifecycle.list_models(app.engine) if m["id"] == good.model_id)[
        "weights_sha256"
    ]
    add_model(
        app.engine,
        "f" * 64,
        "ghost-arch",
        arch="no-such-net",
        input_spec=InputSpec(1, 8, 8, 10).to_dict(),
        weights_sha256=good_sha,
    )
    from gauntlet.scheduler.submit import enqueue_new, expand_suite, new_jobs

    lifecycle.insert_jobs(
        app.engine, new_jobs(expand_suite("quick", "f" * 64, "digits", 40), "quick")
    )
    enqueue_new(app.engine, app.queue)

    stats = _drain(app, LocalExecutor())
    assert (stats.done, stats.failed) == (4, 12)
    by_model: dict[str, list] = {}
    for row in lifecycle.list_jobs(app.engine):
        by_model.setdefault(row["model"], []).append(row)
    assert all(_status(r) == "done" for r in by_model["good"])
    expected = {
        "wrong-classes": "shape mismatch",
        "corrupt": "is corrupt",
        "ghost-arch": "no-such-net",
    }
    for name, fragment in expected.items():
        for row in by_model[name]:
            assert _status(row) == "failed" and fragment in row["error"], row["error"]
            assert row["attempts"] == 1  # permanent: not retried
    assert app.queue.is_empty()
    assert good.model_id in {e.model_id for e in leaderboard(app.engine)}


def _status(row) -> str:
    return str(getattr(row["status"], "value", row["status"]))


def test_nightly_enqueues_only_missing_keys_under_a_lease(tmp_path, digits_models):
    from gauntlet.scheduler.lease import Lease

    app = make_app(tmp_path / "home")
    submit_digits(
        app,
        digits_models["standard"],
        suite="quick",
        name="m",
        n=30,
    )
    _drain(app, LocalExecutor())
    prefix = app.settings.redis_prefix
    report = nightly(app.engine, app.queue, app.redis, prefix=prefix)
    assert (report.models, report.new_jobs, report.enqueued) == (1, 0, 0)

    # A new suite for every model: only its evaluations that have no row are new
    # (its clean evaluation at the same subset size is new, since n differs).
    report = nightly(app.engine, app.queue, app.redis, prefix=prefix, suites=["standard-linf"])
    assert report.new_jobs == 5 and report.enqueued == 5

    # While another nightly holds the lease, a second one refuses to run.
    from gauntlet.cluster.errors import GauntletError

    with Lease(app.redis, "nightly", 60_000, prefix=prefix):
        with pytest.raises(GauntletError, match="holds the lease"):
            nightly(app.engine, app.queue, app.redis, prefix=prefix, suites=["quick"])


def _transfer_suite(tmp_path, n: int, transfer: str):
    """A suite of one clean evaluation whose ``transfer`` section is ``transfer`` (YAML)."""
    suite = tmp_path / "transfer.yaml"
    suite.write_text(
        f"n: {n}\neps: {{linf: {{default: 0.2}}}}\nevaluations:\n  - attack: clean\n"
        f"transfer: {transfer}\n"
    )
    return suite


def test_transfer_matrix_gets_a_row_and_a_column_per_new_model(tmp_path, digits_models):
    from gauntlet.scheduler.boards.transfer import transfer_matrix

    suite = _transfer_suite(tmp_path, 60, "{attack: pgd, norm: linf, params: {steps: 10}}")
    app = make_app(tmp_path / "home")
    first = submit_digits(app, digits_models["standard"], suite=str(suite), name="a")
    assert first.new_jobs == 1  # alone on its dataset: nothing to transfer from or to
    second = submit_digits(app, digits_models["robust"], suite=str(suite), name="b")
    assert second.new_jobs == 3  # its clean job, a -> b and b -> a
    _drain(app, LocalExecutor())
    cells = {(c.source, c.target): c for c in transfer_matrix(app.engine, dataset="digits")}
    assert set(cells) == {("a", "b"), ("b", "a")}
    for cell in cells.values():
        assert 0 <= cell.low <= cell.success_rate <= cell.high <= 1
    # Examples crafted on the standard model rarely fool the adversarially trained one.
    assert cells[("a", "b")].success_rate < cells[("b", "a")].success_rate
    # Nightly finds every pair already evaluated.
    report = nightly(app.engine, app.queue, app.redis, prefix=app.settings.redis_prefix)
    assert report.new_jobs == 0


def test_transfer_from_an_ensemble_of_surrogates(tmp_path, digits_models):
    suite = _transfer_suite(
        tmp_path, 40, "{attack: pgd, norm: linf, params: {steps: 5}, ensemble: true}"
    )
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=str(suite), name="a")
    submit_digits(app, digits_models["robust"], suite=str(suite), name="b")
    # A third model (the robust weights behind a slightly different normalisation).
    third = submit_digits(
        app, digits_models["robust"], suite=str(suite), name="c", input_overrides={"mean": (0.01,)}
    )
    # Its clean job, two pairs both ways, and one ensemble of the two earlier models.
    assert third.new_jobs == 1 + 4 + 1
    _drain(app, LocalExecutor())
    rows = [r for r in lifecycle.list_jobs(app.engine) if r["source_model_id"]]
    (ensemble,) = [r for r in rows if r["source_model_id"] == "ensemble:2"]
    assert _status(ensemble) == "done" and ensemble["model"] == "c"
    job = lifecycle.get_job(app.engine, ensemble["id"])
    assert "transfer-ensemble-2" in job["details"]["adaptations"]
    (entry,) = [e for e in leaderboard(app.engine) if e.model == "c"]
    assert {"transfer", "transfer-ensemble"} <= set(entry.attacks)


def test_calibration_job_reports_before_and_after_temperature_scaling(tmp_path, digits_models):
    from gauntlet.scheduler.boards.calibration import calibration_table
    from gauntlet.workers.calibration import metrics as calibration

    app = make_app(tmp_path / "home")
    report = submit_digits(app, digits_models["standard"], name="m", n=150)
    _drain(app, LocalExecutor())
    (row,) = calibration_table(app.engine, dataset="digits")
    m = row.metrics
    assert row.n == 150
    # The same numbers an independent computation gives on the same subset.
    model = load_classifier(digits_models["standard"], "small-cnn", InputSpec(1, 8, 8, 10))
    x, y, _ = eval_subset("digits", 150, 0, app.settings.data_root)
    with torch.no_grad():
        probs = torch.softmax(model(x).double(), dim=1)
    ece, mce = calibration.ece(probs, y)
    assert (m["ece"], m["mce"]) == (pytest.approx(ece), pytest.approx(mce))
    # Temperature scaling never changes the predicted class.
    assert (
        m["after_ts_accuracy"]
        == m["accuracy"]
        == pytest.approx((probs.argmax(1) == y).double().mean().item())
    )
    assert m["temperature"] > 0
    # Under attack the model is wrong far more often, yet still confident.
    assert m["adv_accuracy"] < m["accuracy"] and m["adv_mean_confidence"] > 0.5
    # The reliability diagram is a stored artifact; calibration never enters the board.
    (job,) = [j for j in lifecycle.list_jobs(app.engine) if j["kind"] == "calibration"]
    sha = lifecycle.get_job(app.engine, job["id"])["details"]["reliability_diagram"]
    assert ArtifactStore(app.settings.artifacts).get(sha).read_bytes().startswith(b"\x89PNG")
    (entry,) = leaderboard(app.engine)
    assert "calibration" not in entry.attacks and report.new_jobs == 4


def test_corruption_job_fills_the_corruption_table(tmp_path, digits_models):
    from gauntlet.scheduler.boards.calibration import calibration_table
    from gauntlet.scheduler.cli import main as cli

    suite = tmp_path / "shift.yaml"
    suite.write_text("n: 80\nevaluations:\n  - {attack: clean, kind: corruption}\n")
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=str(suite), name="m")
    _drain(app, LocalExecutor())
    (row,) = calibration_table(app.engine, kind="corruption")
    m = row.metrics
    assert row.n == 80 and 0 < m["mean_corruption_accuracy"] < m["clean_accuracy"]
    assert m["acc@gaussian-noise@1"] >= m["acc@gaussian-noise@5"]
    assert len([k for k in m if k.startswith("acc@") and k.count("@") == 2]) == 9 * 5
    assert leaderboard(app.engine) == []  # not a robustness evaluation
    from click.testing import CliRunner

    out = CliRunner().invoke(cli, ["corruption"], env={"GAUNTLET_HOME": str(tmp_path / "home")})
    assert out.exit_code == 0 and "gaussian-noise" in out.output
