"""The deploy manifests' roles as processes on this machine, for the rehearsal test.

Each process gets the environment its container would get (``deploy_helpers.container_env``
over the base kustomization), with three kinds of substitution only: the Secret's
values (generated here), the Services' addresses (``gauntlet-redis:6379`` becomes this
test's redis-server, ...) and the container's paths (each volume becomes a folder:
one per PersistentVolumeClaim, shared by the pods that mount it, one per emptyDir, and
one for the rest of the container's filesystem).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from tests.deploy_helpers import K8S, build, configmaps, container, container_env, pod_specs

GAUNTLET = [sys.executable, "-m", "gauntlet.scheduler.cli"]
RAY = str(Path(sys.executable).with_name("ray"))


class Stack:
    """The base manifests, the generated secrets, and the processes started from them."""

    def __init__(self, root: Path, secrets: dict[str, dict]):
        self.root = root
        self.docs = build(K8S / "base")
        self.pods = pod_specs(self.docs)
        self.maps = configmaps(self.docs)
        self.secrets = secrets
        self.addresses: dict[str, str] = {}  # Service host:port -> where it runs here
        self.database: dict[str, str] = {}  # the role and database made for this test
        self.processes: dict[str, tuple[subprocess.Popen, Path]] = {}

    def env(self, label: str, name: str, pod: str | None = None, **overrides: str) -> dict:
        """The container's environment as the kubelet builds it, then localised.

        ``pod`` names the pod (replicas of one template each get their own folders).
        """
        spec = container(self.docs, label, name)
        env = container_env(spec, self.maps, self.secrets)
        pod = pod or _slug(label)
        folders = self.mounts(label, spec, pod)
        for key, value in env.items():
            for service, here in self.addresses.items():
                value = value.replace(service, here)
            env[key] = self.local_path(pod, folders, value)
        if "GAUNTLET_DB_URL" in env and self.database:
            # The manifest's user and database, renamed to this test's own (its password
            # is the Secret's, as in the manifest).
            url = sa.make_url(env["GAUNTLET_DB_URL"]).set(**self.database)
            env["GAUNTLET_DB_URL"] = url.render_as_string(hide_password=False)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GAUNTLET_"))}
        return base | env | {"OMP_NUM_THREADS": "1"} | overrides

    def mounts(self, label: str, spec: dict, pod: str) -> dict[str, Path]:
        volumes = {v["name"]: v for v in self.pods[label].get("volumes", [])}
        folders = {}
        for mount in spec.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            if volume is not None and "persistentVolumeClaim" in volume:
                folder = self.root / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            else:  # an emptyDir, or a StatefulSet's claim template: the pod's own
                folder = self.root / pod / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folders[mount["mountPath"]] = folder
        return folders

    def local_path(self, pod: str, folders: dict[str, Path], value: str) -> str:
        if not value.startswith("/"):
            return value
        for mount in sorted(folders, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return str(folders[mount]) + value[len(mount) :]
        return str(self.root / pod / "rootfs") + value

    def start(self, key: str, args: list[str], env: dict) -> subprocess.Popen:
        log = self.root / f"{key}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes[key] = (proc, log)
        return proc

    def run(self, key: str, args: list[str], env: dict, timeout: float = 120) -> str:
        """A one-shot container (a Job, an init container): its output; it must succeed."""
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{key} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def log(self, key: str) -> str:
        return self.processes[key][1].read_text(errors="replace")[-4000:]

    def wait_http(self, key: str, url: str, timeout: float = 90) -> None:
        """Until ``url`` answers 200 (what the container's readiness probe asks)."""
        proc = self.processes[key][0]
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, f"{key} exited:\n{self.log(key)}"
            assert time.monotonic() < deadline, f"{key} not ready in {timeout} s:\n{self.log(key)}"
            time.sleep(0.3)

    def stop_all(self) -> None:
        """SIGTERM each process group (the scheduler's stop signal), then SIGKILL."""
        for key in reversed(list(self.processes)):
            proc = self.processes[key][0]
            _signal(proc, signal.SIGTERM)
        for key in reversed(list(self.processes)):
            proc = self.processes[key][0]
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _signal(proc, signal.SIGKILL)
            proc.wait(timeout=10)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _slug(label: str) -> str:
    return label.replace("/", "-")


def pids_naming(text: str) -> list[int]:
    """Processes whose command line names ``text`` (a Ray node's temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_ray_leftovers(temp_dirs: list[str]) -> None:
    for temp in temp_dirs:
        for pid in pids_naming(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
