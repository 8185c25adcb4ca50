"""Provenance on every result, and ``gauntlet verify`` rerunning a done eval job."""

from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner
from safetensors.torch import load

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.cluster.settings import Settings
from gauntlet.db.schema import Outcome
from gauntlet.scheduler import lifecycle, service
from gauntlet.scheduler.cli import main
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.workers.provenance import ADVERSARIAL_KEY
from tests.service_helpers import make_app, submit_digits

# One eval and one calibration job, both a 5-step PGD at 0.2 on 40 seeded points.
PGD = "{attack: pgd, norm: linf, params: {steps: 5}"
EVALUATIONS = f"[{PGD}}}, {PGD}, kind: calibration}}]"
SUITE = f"n: 40\nseed: 3\neps: {{linf: {{default: 0.2}}}}\nevaluations: {EVALUATIONS}\n"


def _run_suite(root, weights, **settings):
    """An app under ``root`` whose eval and calibration jobs of one suite ran to done."""
    suite = root / "prov.yaml"
    root.mkdir(parents=True, exist_ok=True)
    suite.write_text(SUITE)
    app = make_app(root / "home", **settings)
    submit_digits(app, weights, suite=str(suite), name="standard")
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert (stats.done, stats.failed) == (2, 0)
    jobs = {
        j["kind"]: lifecycle.get_job(app.engine, j["id"]) for j in lifecycle.list_jobs(app.engine)
    }
    return app, jobs


@pytest.fixture
def finished(tmp_path, digits_models):
    """An app whose eval and calibration jobs of one suite ran to done."""
    return _run_suite(tmp_path, digits_models["standard"])


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()
    env = {"GAUNTLET_HOME": str(tmp_path / "home"), "GAUNTLET_LEASE_SECONDS": "2"}

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke


def _one_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0], result.output


def test_every_kind_records_provenance_and_eval_keeps_its_examples(finished):
    app, jobs = finished
    for job in jobs.values():
        record = job["details"]["provenance"]
        assert record["torch"] == torch.__version__
        assert record["seed"] == job["spec"]["seed"] == 3
        assert record["batch_size"] == job["spec"].get("batch_size", 256)
        assert record["wall_seconds"] > 0 and record["gauntlet"]
        if not torch.cuda.is_available():
            assert record["cuda"] is None and record["cudnn"] is None
        assert record["device_model"]
    record = jobs["eval"]["details"]["provenance"]
    path = ArtifactStore(app.settings.artifacts).get(record["adversarial_sha256"])
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["adversarial_sha256"]
    assert record["adversarial_kept"] is True
    assert load(data)[ADVERSARIAL_KEY].shape == (40, 1, 8, 8)
    assert "adversarial_sha256" not in jobs["calibration"]["details"]["provenance"]


def test_verify_reports_identical_then_the_tampered_bit(finished, cli):
    app, jobs = finished
    job_id = jobs["eval"]["id"]
    report = service.verify_job(app, job_id)
    assert (report.verdict, report.points_differing, report.hash_matches) == ("identical", 0, True)
    assert report.ok and report.n == 40

    shown = cli("verify", job_id, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["verdict"] == "identical"
    text = cli("job", job_id)
    assert "provenance" in text.output and torch.__version__ in text.output

    # Flip the first example's clean bit in the stored row: verify must find that point.
    with app.engine.begin() as conn:
        clean = conn.scalar(sa.select(Outcome.clean).where(Outcome.job_id == job_id))
        tampered = bytes([clean[0] ^ 0x80]) + bytes(clean[1:])
        conn.execute(sa.update(Outcome).where(Outcome.job_id == job_id).values(clean=tampered))
    report = service.verify_job(app, job_id)
    assert (report.verdict, report.clean_flips, report.robust_flips) == ("different", 1, 0)
    assert report.points_differing == 1 and report.hash_matches
    shown = cli("verify", job_id)
    assert shown.exit_code == 1 and "different" in shown.output
    assert "points differing: 1 of 40" in shown.output


def test_verify_refuses_what_it_cannot_rerun(finished, cli):
    app, jobs = finished
    _one_error(cli("verify", 999), "there is no job 999")
    _one_error(cli("verify", jobs["calibration"]["id"]), "only eval jobs can be verified")
    _one_error(cli("verify", "seven"), "seven")
    with app.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET status = 'queued' WHERE id = :id"), {"id": jobs["eval"]["id"]}
        )
    with pytest.raises(GauntletError, match="only a done job"):
        service.verify_job(app, jobs["eval"]["id"])


def test_examples_not_kept_are_hashed_but_not_stored(finished, tmp_path, digits_models):
    kept = finished[1]["eval"]["details"]["provenance"]
    app, jobs = _run_suite(
        tmp_path / "lean", digits_models["standard"], GAUNTLET_KEEP_ADVERSARIAL=0
    )
    record = jobs["eval"]["details"]["provenance"]
    # The same points and seed make the same examples: the same hash, but no file.
    assert record["adversarial_kept"] is False
    assert record["adversarial_sha256"] == kept["adversarial_sha256"]
    with pytest.raises(GauntletError, match="missing from the store"):
        ArtifactStore(app.settings.artifacts).get(record["adversarial_sha256"])


def test_keep_adversarial_setting():
    assert Settings.from_env({}).keep_adversarial is True
    assert Settings.from_env({"GAUNTLET_KEEP_ADVERSARIAL": "0"}).keep_adversarial is False
    with pytest.raises(GauntletError, match="GAUNTLET_KEEP_ADVERSARIAL"):
        Settings.from_env({"GAUNTLET_KEEP_ADVERSARIAL": "maybe"})
