"""A SIGKILLed scheduler leaves no process of its local Ray behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.service_helpers import make_app

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(pid)
    return found


def test_sigkilled_scheduler_takes_its_local_ray_down(tmp_path):
    app = make_app(tmp_path / "home")
    app.queue.ensure_group()  # the embedded Redis is ours, not the scheduler's
    env = dict(os.environ, GAUNTLET_HOME=str(app.settings.home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gauntlet.scheduler.cli", "scheduler", "--num-cpus", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            ray = {p: c for p, c in _descendants(proc.pid).items() if "ray" in c}
            agents = [c for c in ray.values() if c.startswith("ray::RuntimeEnvAgent")]
            if agents and any(c.startswith("ray::DashboardAgent") for c in ray.values()):
                break
            assert proc.poll() is None, "the scheduler exited by itself"
            assert time.monotonic() < deadline, "Ray's agents never started"
            time.sleep(0.2)
        time.sleep(1.5)  # let the watchdog's once-a-second look see them
        ray = {p: c for p, c in _descendants(proc.pid).items() if "ray" in c}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 20
    while [p for p in ray if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: ray[p] for p in ray if _alive(p)}
    for pid in left:  # do not leak them into the rest of the run
        os.kill(pid, signal.SIGKILL)
    assert left == {}
