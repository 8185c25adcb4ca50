"""The remote CLI: with GAUNTLET_API_URL set, commands go through `gauntlet serve`.

A real server process and real CLI processes: the client's own home is empty, so
anything it prints came over HTTP. Each command must print what the same command
prints on the server's local stack.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from tests.test_api import served  # noqa: F401 - the real `gauntlet serve` fixture


def _gauntlet(*args: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gauntlet.scheduler.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_remote_commands_print_what_local_ones_print(served, digits_models, tmp_path):  # noqa: F811
    url, token, log = served
    server = {**os.environ, "GAUNTLET_HOME": str(tmp_path / "home"), "COLUMNS": "120"}
    client = {
        **os.environ,
        "GAUNTLET_HOME": str(tmp_path / "client-home"),
        "GAUNTLET_API_URL": url,
        "GAUNTLET_TOKEN": token,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "COLUMNS": "120",
    }
    weights = str(digits_models["standard"])
    card = tmp_path / "card.yaml"
    card.write_text("authors: A. Tester\nvenue: a workshop\nclean_acc: 99.0\n")
    sent = _gauntlet(
        "submit", weights, "--arch", "small-cnn", "--dataset", "digits", "--n", "20",
        "--name", "remote-cnn", "--card", str(card), "--json", env=client,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    report = json.loads(sent.stdout)
    assert report["name"] == "remote-cnn" and report["new_jobs"] == report["jobs"] > 0
    # The card went over HTTP and sits on the server's model row.
    shown = json.loads(_gauntlet("model", "remote-cnn", "--json", env=server).stdout)
    assert shown["card"]["authors"] == "A. Tester" and shown["card"]["venue"] == "a workshop"
    drained = _gauntlet("scheduler", "--drain", "--local", env=server)
    assert drained.returncode == 0, drained.stderr

    for command in (["leaderboard"], ["leaderboard", "--json"], ["calibration", "--json"]):
        remote, local = _gauntlet(*command, env=client), _gauntlet(*command, env=server)
        assert remote.returncode == local.returncode == 0, remote.stderr + local.stderr
        assert remote.stdout == local.stdout, command
    board = json.loads(_gauntlet("leaderboard", "--json", env=client).stdout)
    assert [row["model"] for row in board] == ["remote-cnn"]

    jobs = json.loads(_gauntlet("jobs", "--json", env=client).stdout)
    local_jobs = json.loads(_gauntlet("jobs", "--json", env=server).stdout)
    assert [(j["id"], j["status"]) for j in jobs] == [(j["id"], j["status"]) for j in local_jobs]
    # Nothing is left to run, so --watch prints the listing once and ends.
    watched = json.loads(_gauntlet("jobs", "--watch", "--json", env=client).stdout)
    assert [j["id"] for j in watched] == [j["id"] for j in jobs]
    job_id = str(jobs[0]["id"])
    remote_job = json.loads(_gauntlet("job", job_id, "--json", env=client).stdout)
    local_job = json.loads(_gauntlet("job", job_id, "--json", env=server).stdout)
    assert remote_job["metrics"] == local_job["metrics"] and remote_job["metrics"]

    # Writes: a done job needs --force to rerun; a queued one can be cancelled.
    refused = _gauntlet("rerun", job_id, env=client)
    assert refused.returncode == 1 and "add --force" in refused.stderr
    assert _gauntlet("rerun", job_id, "--force", env=client).returncode == 0
    assert _gauntlet("cancel", job_id, env=client).returncode == 0
    cancelled = json.loads(_gauntlet("job", job_id, "--json", env=server).stdout)
    assert (cancelled["status"], cancelled["error"]) == ("failed", "cancelled by the operator")

    # A bad token: one Error: line, exit 1, and the token is not repeated anywhere.
    forged = token[:-4] + "xxxx"
    bad = _gauntlet("cancel", job_id, env={**client, "GAUNTLET_TOKEN": forged})
    assert bad.returncode == 1 and bad.stderr.startswith("Error:")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert forged not in bad.stderr + bad.stdout and token not in log.read_text()

    # login keeps the token in a file only its user can read; then no variable is needed.
    without = {k: v for k, v in client.items() if k != "GAUNTLET_TOKEN"}
    logged = _gauntlet("login", "--token", token, env=without)
    assert logged.returncode == 0, logged.stderr
    path = tmp_path / "config" / "gauntlet" / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == token
    assert token not in logged.stdout
    assert _gauntlet("rerun", job_id, "--force", env=without).returncode == 0
