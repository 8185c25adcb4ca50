"""Rehearsal: the Kubernetes manifests' roles as processes here, through a nightly run.

PostgreSQL (a role and database of this test's own, with a password), Redis with a
password and its append-only file, a Ray head and a worker node with the cluster token,
the migration Job and the pods' init containers, two scheduler replicas, the API
server; then a model goes in through the API, the nightly command runs, the jobs finish
on the worker node and the leaderboard comes back through the API. Every process's
environment and arguments are read from deploy/k8s/base (``rehearsal_helpers.Stack``).

What differs from a cluster, and why: one machine, so the schedulers attach to the
head's Ray node instead of a sidecar node each (a driver needs a raylet on its own IP;
here every node has the same one), each process binds free ports of its own, the head
runs without its dashboard (its binding is checked in test_deploy) and the worker gets
one CPU and no GPU instead of the group's limits.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
import tempfile
import time
import uuid

import httpx
import pytest
import redis
import sqlalchemy as sa
import torch
from prometheus_client.parser import text_string_to_metric_families

from gauntlet.workers.datasets import eval_subset
from gauntlet.workers.models import InputSpec, load_classifier
from tests.conftest import POSTGRES_ENV, _server_url
from tests.deploy_helpers import SECRET, container, expand, find, ray_start_args
from tests.queue_helpers import free_port
from tests.rehearsal_helpers import GAUNTLET, RAY, Stack, kill_ray_leftovers

pytestmark = [pytest.mark.ray, pytest.mark.postgres]

N = 50  # test points per evaluation: the quick suite's four jobs take seconds each


@pytest.fixture
def rehearsal_postgres():
    """A login role with a password and a database it owns; both dropped afterwards.

    The machine's PostgreSQL trusts local connections, so the password is sent (from
    the Secret, in GAUNTLET_DB_URL) but not actually checked there; a real server
    configured for scram-sha-256 would check it.
    """
    import psycopg
    from psycopg import sql

    url = sa.make_url(_server_url(POSTGRES_ENV))
    admin = {
        "host": url.host,
        "port": url.port or 5432,
        "user": url.username,
        "dbname": url.database,
    }
    name = f"gauntlet_rehearsal_{uuid.uuid4().hex[:10]}"
    password = secrets.token_hex(16)
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(*[sql.Identifier(name)] * 2))
    yield admin["host"], admin["port"], name, password
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: the rehearsal needs it (apt-get install {name})")
    return path


def _ray_ports() -> list[str]:
    """Free ports for a node's own servers: two nodes share this machine."""
    flags = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc")
    ports = [f"--{flag}-port={free_port()}" for flag in flags]
    return ports + [
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def _start_redis(stack: Stack, port: int) -> str:
    label = "StatefulSet/gauntlet-redis"
    spec = container(stack.docs, label, "redis")
    env = stack.env(label, "redis")
    folders = stack.mounts(label, spec, "redis")
    args = [stack.local_path("redis", folders, expand(a, env)) for a in spec["args"]]
    command = [_binary(spec["command"][0]), *args, "--port", str(port), "--bind", "127.0.0.1"]
    stack.start("redis", command, env)
    password = env["REDIS_PASSWORD"]
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port, password=password).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, stack.log("redis")
            time.sleep(0.1)
    with pytest.raises(redis.AuthenticationError):  # the password is enforced
        redis.Redis(port=port).ping()
    return str(folders["/data"])


def _start_ray(stack: Stack, gcs_port: int, temps: list[str]) -> None:
    cluster = find(stack.docs, "RayCluster", "gauntlet")["spec"]
    head, (gpu,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    common = ["start", "--block", "--disable-usage-stats", "--object-store-memory=100000000"]
    for key, group, extra in (
        ("ray-head", head, ["--head", f"--port={gcs_port}", "--include-dashboard=false"]),
        ("ray-worker", gpu, [f"--address={stack.addresses['gauntlet-head-svc:6379']}"]),
    ):
        temp = tempfile.mkdtemp(prefix=f"g{key[4]}-")  # short: Ray's socket paths are limited
        temps.append(temp)
        params = ray_start_args(group["rayStartParams"])
        if group is gpu:  # KubeRay derives these from the container limits
            params += ["--num-cpus=1", "--num-gpus=0"]
        label = "RayCluster/gauntlet/head" if group is head else "RayCluster/gauntlet/gpu"
        name = group["template"]["spec"]["containers"][0]["name"]
        args = [RAY, *common, *params, *extra, *_ray_ports(), f"--temp-dir={temp}"]
        stack.start(key, args, stack.env(label, name, pod=key))


def _run_init_containers(stack: Stack, label: str, pod: str) -> None:
    for spec in stack.pods[label].get("initContainers", []):
        if "command" in spec:  # the ray-node sidecar: on one host, the head's node serves
            continue
        stack.run(
            f"{pod}-{spec['name']}", GAUNTLET + spec["args"], stack.env(label, spec["name"], pod)
        )


def _local_args(args: list[str], **values: str) -> list[str]:
    """The container's arguments with ``--host``/``--port`` values of this machine."""
    out = list(args)
    for option, value in values.items():
        out[out.index(f"--{option}") + 1] = value
    return out


def _wait_for_suite(url: str, headers: dict, stack: Stack, timeout: float = 150) -> list[dict]:
    """Until the suite's jobs are done (after the submission gate's, when it is on)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = httpx.get(f"{url}/api/jobs", params={"limit": 100}, headers=headers).json()
        failed = [j for j in jobs if j["status"] == "failed"]
        assert not failed, (failed, stack.log("scheduler-1"), stack.log("scheduler-2"))
        suite = [j for j in jobs if j["kind"] in ("eval", "calibration")]
        if len(suite) == 4 and all(j["status"] == "done" for j in jobs):
            return suite
        logs = stack.log("scheduler-1") + stack.log("scheduler-2") + stack.log("ray-worker")
        assert time.monotonic() < deadline, f"jobs not done: {jobs}\n{logs}"
        time.sleep(0.5)


def _clean_accuracy(path, data_root) -> float:
    """The digits model's accuracy on the leaderboard's subset, computed in-process."""
    x, y, _ = eval_subset("digits", N, 0, data_root)
    model = load_classifier(path, "small-cnn", InputSpec(1, 8, 8, 10))
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_the_manifests_roles_run_a_nightly_evaluation(tmp_path, digits_models, rehearsal_postgres):
    pg_host, pg_port, role, pg_password = rehearsal_postgres
    generated = {
        "ray-token": secrets.token_hex(32),
        "postgres-password": pg_password,
        "redis-password": secrets.token_hex(16),
    }
    stack = Stack(tmp_path, {SECRET: generated})
    stack.database = {"username": role, "database": role}
    redis_port, gcs_port = free_port(), free_port()
    ip = socket.gethostbyname(socket.gethostname())
    stack.addresses = {
        "gauntlet-postgres:5432": f"{pg_host}:{pg_port}",
        "gauntlet-redis:6379": f"127.0.0.1:{redis_port}",
        "gauntlet-head-svc:6379": f"{ip}:{gcs_port}",
    }
    temps: list[str] = []
    try:
        redis_data = _start_redis(stack, redis_port)
        _start_ray(stack, gcs_port, temps)
        # The migration Job, then each pod's init containers (which find it done).
        job = container(stack.docs, "Job/gauntlet-migrate", "migrate")
        migrated = stack.run(
            "migrate", GAUNTLET + job["args"], stack.env("Job/gauntlet-migrate", "migrate")
        )
        assert "database at revision" in migrated

        label = "Deployment/gauntlet-scheduler"
        main = container(stack.docs, label, "scheduler")
        metrics = {}
        for replica in ("scheduler-1", "scheduler-2"):
            _run_init_containers(stack, label, replica)
            port = str(free_port())
            env = stack.env(label, "scheduler", replica, GAUNTLET_METRICS_PORT=port)
            assert env["GAUNTLET_ARTIFACT_TRANSPORT"] == "ray" and "@" in env["GAUNTLET_REDIS_URL"]
            stack.start(replica, GAUNTLET + main["args"], env)
            metrics[replica] = f"http://127.0.0.1:{port}{main['readinessProbe']['httpGet']['path']}"

        label = "Deployment/gauntlet-serve"
        serve = container(stack.docs, label, "serve")
        _run_init_containers(stack, label, "serve")
        serve_env = stack.env(label, "serve", "serve")
        api_port = str(free_port())
        stack.start(
            "serve",
            GAUNTLET + _local_args(serve["args"], host="127.0.0.1", port=api_port),
            serve_env,
        )
        url = f"http://127.0.0.1:{api_port}"
        stack.wait_http("serve", url + serve["readinessProbe"]["httpGet"]["path"])
        for replica, address in metrics.items():
            stack.wait_http(replica, address, timeout=120)

        # README "Deploy": the first admin token, from inside the API pod.
        added = stack.run("users", GAUNTLET + ["users", "add", "ops", "--admin"], serve_env)
        headers = {"Authorization": f"Bearer {added.strip().splitlines()[-1]}"}
        weights = digits_models["standard"].read_bytes()
        query = {"arch": "small-cnn", "dataset": "digits", "name": "rehearsed", "n": N}
        query["sha256"] = hashlib.sha256(weights).hexdigest()
        sent = httpx.post(f"{url}/api/models", params=query, content=weights, headers=headers)
        assert sent.status_code == 201, sent.text + stack.log("serve")
        submitted = sent.json()
        assert submitted["new_model"] and submitted["jobs"] == 4, submitted  # the quick suite

        # The nightly CronJob's command, at once and once all is done: it sees the API's
        # model in the same database and never queues an evaluation twice (at first the
        # model may still be held by its submission gate, and is then not counted).
        cron = container(stack.docs, "CronJob/gauntlet-nightly", "nightly")
        nightly_env = stack.env("CronJob/gauntlet-nightly", "nightly", "nightly")
        first = json.loads(stack.run("nightly", GAUNTLET + cron["args"], nightly_env))
        assert first["new_jobs"] == 0, first
        jobs = _wait_for_suite(url, headers, stack)
        report = json.loads(stack.run("nightly", GAUNTLET + cron["args"], nightly_env))
        assert (report["models"], report["expanded"], report["new_jobs"]) == (1, 4, 0), report
        board = httpx.get(f"{url}/api/leaderboard", params={"dataset": "digits"}, headers=headers)
        (row,) = [r for r in board.json() if r["model"] == "rehearsed"]
        data_root = tmp_path / "reference-data"
        assert row["n"] == N
        assert row["clean_accuracy"] == pytest.approx(
            _clean_accuracy(digits_models["standard"], data_root)
        )
        assert 0.0 <= row["robust_accuracy"] < row["clean_accuracy"]  # PGD at 0.2 breaks some

        # The jobs ran on the worker node, which fetched the weights through a scheduler
        # into its own store (no shared volume), and Prometheus sees them done.
        worker_store = tmp_path / "ray-worker" / "scratch" / "artifacts"
        assert query["sha256"] in {p.name for p in worker_store.rglob("*") if p.is_file()}
        scraped = httpx.get(metrics["scheduler-2"]).text
        done = {
            s.labels["kind"]: s.value
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
            if s.name == "gauntlet_jobs" and s.labels["status"] == "done"
        }
        kinds = {j["kind"] for j in jobs}
        assert {k: done[k] for k in kinds} == {"eval": 3.0, "calibration": 1.0}
        assert any("appendonly" in p.name for p in (tmp_path / "redis" / "redisdata").rglob("*"))
        assert redis_data == str(tmp_path / "redis" / "redisdata")
        for key in ("scheduler-1", "scheduler-2", "serve", "ray-head", "ray-worker", "redis"):
            assert stack.processes[key][0].poll() is None, f"{key} died:\n{stack.log(key)}"
    finally:
        stack.stop_all()
        kill_ray_leftovers(temps)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
