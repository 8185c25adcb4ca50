"""A real multi-node Ray on this machine: no shared filesystem, and a node lost mid-job.

``ray start --head`` (no CPUs: no job runs beside the scheduler) and worker nodes started
by ``ray start --address``, each a process group of its own with its own temporary
directory and its own, empty, gauntlet home. The scheduler connects with
``GAUNTLET_RAY_ADDRESS`` (so artifacts go through Ray, the default for a cluster). Jobs
must run on the worker node with weights fetched through the scheduler; then a slow job
loses its node mid-way, a fresh node joins, and the job must finish exactly once there,
resuming from its checkpoint.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from safetensors.torch import load, save

from gauntlet.cluster.artifacts import ArtifactStore, sha256_file
from gauntlet.db.schema import Job, MetricRow, Outcome
from gauntlet.scheduler.run import make_executor
from gauntlet.workers import results
from tests.queue_helpers import free_port, status
from tests.rehearsal_helpers import pids_naming
from tests.service_helpers import make_app, submit_digits

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
# The head notices a dead node within about a second instead of the default half minute.
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "500",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "2",
}


class Cluster:
    """The Ray processes this test started, by process group, and their temp dirs."""

    def __init__(self, root: Path):
        self.root = root
        self.token = secrets.token_hex(32)
        self.ip = socket.gethostbyname(socket.gethostname())
        self.port = free_port()
        self.nodes: dict[str, tuple[subprocess.Popen, str]] = {}
        self.live: set[str] = set()

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def env(self, home: Path | None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GAUNTLET_"))}
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "OMP_NUM_THREADS": "1"}
        env |= FAST_HEALTH
        if home is not None:  # a worker node: its own, empty, home and artifact root
            env |= {"GAUNTLET_HOME": str(home), "GAUNTLET_ARTIFACTS": str(home / "artifacts")}
        return env

    def start(self, label: str, *, head: bool = False) -> Path | None:
        # Short: Ray's unix sockets live under the temp dir, and their paths are limited.
        temp = tempfile.mkdtemp(prefix=f"gr{label}-")
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        args = [RAY, "start", "--block", "--temp-dir", temp, "--disable-usage-stats"]
        args += ["--num-gpus", "0", "--object-store-memory", str(100 * 1024**2)]
        for flag, port in ports.items():
            args += [flag, str(port)]
        home = None
        if head:
            args += ["--head", "--port", str(self.port), "--num-cpus", "0"]
            args += ["--include-dashboard", "false"]
        else:
            home = self.root / f"home-{label}"
            args += ["--address", self.address, "--num-cpus", "1"]
        log = open(self.root / f"ray-{label}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, env=self.env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.nodes[label] = (proc, temp)
        self.live.add(label)
        return home

    def alive(self) -> None:
        """Fail at once, with its log, if a node's ``ray start`` has exited."""
        for label in self.live:
            proc = self.nodes[label][0]
            if proc.poll() is not None:
                log = (self.root / f"ray-{label}.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"ray start for node {label} exited ({proc.returncode}):\n{log}")

    def kill(self, label: str) -> None:
        """SIGKILL the node's process group and any process left that names its temp dir."""
        proc, temp = self.nodes[label]
        self.live.discard(label)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        for pid in pids_naming(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        for label in list(self.nodes):
            self.kill(label)
            shutil.rmtree(self.nodes.pop(label)[1], ignore_errors=True)


def _cpu_nodes(ray) -> set[str]:
    return {
        n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0
    }


def _wait_for(what: str, check, timeout: float = 60.0, cluster: Cluster | None = None):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if cluster is not None:
            cluster.alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _jobs(app) -> dict[int, dict]:
    with app.engine.connect() as conn:
        rows = conn.execute(sa.select(Job.__table__)).mappings().all()
    return {row["id"]: dict(row) for row in rows}


def _count(app, table, job_id: int) -> int:
    with app.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(table).where(table.c.job_id == job_id)
        ).scalar_one()


def _metric_names(app, job_id: int) -> list[str]:
    with app.engine.connect() as conn:
        query = sa.select(MetricRow.name).where(MetricRow.job_id == job_id)
        return sorted(conn.execute(query).scalars())


def _slow_suite(folder: Path) -> str:
    # Six chunks of 64 points, each a few hundred PGD steps: seconds per chunk.
    path = folder / "slow.yaml"
    path.write_text(
        "n: 384\nbatch_size: 64\nevaluations:\n"
        "  - {attack: pgd, norm: linf, eps: 0.2, params: {steps: 300}}\n"
    )
    return str(path)


def test_jobs_run_on_other_nodes_and_survive_losing_one(tmp_path, digits_models, monkeypatch):
    import ray

    cluster = Cluster(tmp_path)
    try:
        cluster.start("head", head=True)
        home_b = cluster.start("b")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
        _reload_ray_auth()  # Ray read its auth settings when first imported
        # No gate or follow-up jobs: the jobs here are exactly the suites' evaluations.
        app = make_app(
            tmp_path / "scheduler",
            GAUNTLET_RAY_ADDRESS=cluster.address,
            GAUNTLET_GATE="0",
            GAUNTLET_FOLLOWUPS="0",
        )
        assert app.settings.artifact_transport_resolved == "ray"
        _wait_for("the head", lambda: _try_connect(ray, cluster.address), 60, cluster)
        executor = make_executor(app, local=False)
        (node_b,) = _wait_for("node b", lambda: _cpu_nodes(ray), 60, cluster)
        head = ray.get_runtime_context().get_node_id()
        assert head != node_b  # the scheduler is on the head; jobs can only run on b

        # 1. A quick suite's jobs run on b, with weights fetched through the scheduler.
        report = submit_digits(app, digits_models["standard"], name="standard", n=100)
        stats = app.dispatcher(executor, max_in_flight=2).run(drain=True)
        assert (stats.done, stats.failed) == (report.new_jobs, 0)
        first = _jobs(app)
        assert {row["details"]["ray_node"] for row in first.values()} == {node_b}
        weights = sha256_file(digits_models["standard"])
        assert sorted(p.name for p in (home_b / "artifacts").rglob("*") if p.is_file()) == [weights]
        store = ArtifactStore(app.settings.artifacts)
        kept = [r["details"]["provenance"].get("adversarial_sha256") for r in first.values()]
        assert all(store.get(sha) for sha in kept if sha)  # in the scheduler's store, intact

        # 2. A slow job loses its node mid-way; a fresh node with an empty home takes it.
        submit_digits(app, digits_models["standard"], name="standard", suite=_slow_suite(tmp_path))
        (slow,) = set(_jobs(app)) - set(first)
        checkpoint = app.settings.artifacts / "checkpoints" / f"job-{slow}.safetensors"
        runner = threading.Thread(
            target=lambda: app.dispatcher(executor, max_in_flight=1).run(drain=True), daemon=True
        )
        runner.start()
        _wait_for("the slow job's first checkpoint", checkpoint.exists, 90, cluster)
        cluster.kill("b")
        killed = time.monotonic()
        _wait_for("node b's death", lambda: not _cpu_nodes(ray), 30, cluster)
        # Mark what the first attempt found so that no recomputation could repeat it: every
        # clean point it attacked counts as robust. The resumed attempt must keep that.
        state = load(checkpoint.read_bytes())
        done = int(state["done"])
        assert 0 < done < 384, done
        assert int((state["clean"][:done] & ~state["robust"][:done]).sum()) > 0
        state["robust"][:done] = state["clean"][:done]
        store.put_named(f"checkpoints/job-{slow}.safetensors", save(state))
        home_c = cluster.start("c")
        (node_c,) = _wait_for("node c", lambda: _cpu_nodes(ray), 60, cluster)
        runner.join(timeout=120)
        assert not runner.is_alive(), "the slow job did not finish on node c"

        row = _jobs(app)[slow]
        print(
            f"node b killed with {done}/384 points done; the job finished on node c "
            f"{time.monotonic() - killed:.1f} s later after {row['attempts']} attempts"
        )
        assert status(row) == "done" and row["attempts"] > 1, row
        assert row["details"]["ray_node"] == node_c
        # One set of metrics (the same names as the first PGD job's) and one outcome row.
        (pgd,) = [i for i, r in first.items() if r["attack"] == "pgd" and r["kind"] == "eval"]
        assert _metric_names(app, slow) == _metric_names(app, pgd)
        assert _count(app, Outcome.__table__, slow) == 1
        with app.engine.connect() as conn:
            query = sa.select(Outcome.__table__).where(Outcome.job_id == slow)
            outcome = conn.execute(query).mappings().one()
        robust = results.unpack(outcome["robust"], 384)
        assert (robust[:done] == state["clean"][:done].numpy()).all()  # resumed, not redone
        assert (home_c / "artifacts" / weights[:2] / weights).exists()
        assert not checkpoint.exists()
    finally:
        ray.shutdown()
        cluster.stop_all()
        monkeypatch.undo()
        _reload_ray_auth()  # later tests in this process start their own local Ray


def _reload_ray_auth() -> None:
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


def _try_connect(ray, address: str) -> bool:
    """Whether the head's GCS answers (ray.init itself is made by the scheduler)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True
