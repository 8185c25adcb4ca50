"""The CLI through click's CliRunner: clean errors, idempotent submit, JSON listings."""

from __future__ import annotations

import json
import pickle

import pytest
from click.testing import CliRunner

from gauntlet.scheduler.cli import main


@pytest.fixture
def weights(digits_models):
    return digits_models["standard"]


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()
    env = {"GAUNTLET_HOME": str(tmp_path / "home")}

    def invoke(*args):
        return runner.invoke(main, list(map(str, args)), env=env, catch_exceptions=False)

    return invoke


class Sentinel:
    """Unpickling this creates a file: proof that a loader executed the payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("Error:") and fragment in result.output, result.output


def test_submit_refuses_a_pickle_without_unpickling_it(run, tmp_path):
    sentinel = tmp_path / "executed"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(Sentinel(str(sentinel))))
    result = run("submit", evil, "--arch", "small-cnn", "--dataset", "digits")
    _one_line_error(result, "pickle")
    assert not sentinel.exists()
    assert json.loads(run("list", "models", "--json").output) == []


def test_submit_errors_are_one_clear_line(run, tmp_path, weights):
    _one_line_error(run("submit", weights, "--arch", "nope", "--dataset", "digits"), "nope")
    _one_line_error(
        run("submit", weights, "--arch", "small-cnn", "--dataset", "imagenet-9k"), "imagenet-9k"
    )
    _one_line_error(
        run(
            "submit",
            weights,
            "--arch",
            "small-cnn",
            "--dataset",
            "digits",
            "--suite",
            "no-such-suite",
        ),
        "known suites",
    )
    bad_attack = tmp_path / "bad-attack.yaml"
    bad_attack.write_text("evaluations:\n  - attack: deepfake\n    norm: linf\n    eps: 0.1\n")
    _one_line_error(
        run("submit", weights, "--arch", "small-cnn", "--dataset", "digits", "--suite", bad_attack),
        "deepfake",
    )
    bad_eps = tmp_path / "bad-eps.yaml"
    bad_eps.write_text("evaluations:\n  - attack: pgd\n    norm: linf\n    eps: 3\n")
    _one_line_error(
        run("submit", weights, "--arch", "small-cnn", "--dataset", "digits", "--suite", bad_eps),
        "eps",
    )
    # None of those stored a model or a job.
    assert json.loads(run("list", "models", "--json").output) == []
    assert json.loads(run("jobs", "--json").output) == []


def test_submit_is_idempotent_and_listings_are_json(run, weights):
    args = ("submit", weights, "--arch", "small-cnn", "--dataset", "digits", "--n", 30, "--json")
    first = json.loads(run(*args).output)
    second = json.loads(run(*args).output)
    assert (first["new_jobs"], first["enqueued"]) == (4, 4)
    assert (second["new_model"], second["new_jobs"], second["enqueued"]) == (False, 0, 0)

    result = run("scheduler", "--drain", "--local")
    assert result.exit_code == 0, result.output
    jobs = json.loads(run("jobs", "--json").output)
    assert len(jobs) == 4 and {j["status"] for j in jobs} == {"done"}
    board = json.loads(run("leaderboard", "--json").output)
    assert len(board) == 1 and board[0]["n"] == 30 and board[0]["model"] == "standard"
    assert 0 <= board[0]["robust_accuracy"] <= board[0]["clean_accuracy"] <= 1
    assert "standard" in run("leaderboard").output  # the rich table renders too


def test_registries_list_and_db_upgrade(run):
    attacks = {row["name"] for row in json.loads(run("list", "attacks", "--json").output)}
    assert {"clean", "fgsm", "pgd"} <= attacks
    suites = {row["name"] for row in json.loads(run("list", "suites", "--json").output)}
    assert {"quick", "standard-linf"} <= suites
    result = run("db", "upgrade")
    assert result.exit_code == 0 and "revision" in result.output
