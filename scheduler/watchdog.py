"""A watchdog that takes a local Ray down with the scheduler that started it.

``ray.init`` without an address starts Ray's own processes as children of the scheduler.
Ray stops them from an exit handler, which a SIGKILL (or the OOM killer) never runs:
the GCS and the raylet then go, but the raylet's agents (DashboardAgent,
RuntimeEnvAgent) try to report the raylet's death to the GCS that is gone and stay
behind for good. Ray's processes set up their own process groups and signal handling,
so asking the kernel to kill them with their parent is not possible from here.

The watchdog is a tiny separate process, in a session of its own so a terminal's Ctrl-C
does not reach it. It holds the read end of a pipe whose write end only the scheduler
has: the pipe reads EOF exactly when the scheduler is gone, however it went. Meanwhile
it keeps a list, refreshed every second, of the scheduler's descendants that are Ray's
(their program lies in the ray package, or they are named ``ray::...``; the embedded
Redis server, also a child, is left alone so it can write its data out), each with its
start time so a reused pid is never killed. At EOF it kills every one still alive.

Linux only (it reads /proc); elsewhere nothing is started.
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCHER = r"""
import os, select, signal, sys

parent, ray_dir = int(sys.argv[1]), sys.argv[2]
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)  # outlive the scheduler's group to clean up after it


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19]  # ppid, start time


def is_ray(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    return argv[0].startswith("ray::") or any(a.startswith(ray_dir) for a in argv[:3])


def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid, start = stat(int(name))
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append((int(name), start))
    found, todo = {}, [parent]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid != os.getpid():
                found[pid] = start
                todo.append(pid)
    return found


def still(pid, start):
    try:
        return stat(pid)[1] == start
    except (OSError, IndexError, ValueError):
        return False


watched = {}
while True:
    try:
        watched = {p: s for p, s in descendants().items() if still(p, s) and is_ray(p)} or watched
    except OSError:
        pass
    readable, _, _ = select.select([sys.stdin], [], [], 1.0)
    if readable and not os.read(sys.stdin.fileno(), 1):
        break
for pid, start in watched.items():
    if still(pid, start):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""

_started: subprocess.Popen | None = None


def start_watchdog() -> subprocess.Popen | None:
    """Start the watchdog for this process once; None where /proc is not available."""
    global _started
    if _started is not None or not os.path.isdir("/proc/self"):
        return _started
    import ray

    ray_dir = os.path.dirname(os.path.abspath(ray.__file__)) + os.sep
    _started = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(os.getpid()), ray_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return _started
