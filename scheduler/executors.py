"""Where a claimed job runs: a Ray task, or in-process (same contract).

The dispatcher only sees ``submit``/``ready``/``outcome``/``cancel``. The local executor
runs jobs in this process, which lets service tests exercise the whole queue and
database path without starting Ray (like rq's burst worker). It runs them on one
background thread, one at a time in submission order: the dispatcher's loop must keep
renewing the leases of the jobs it holds while one runs, or another replica would take
a job that is alive and throw its result away.

Cancelling a Ray task kills its worker process. A Python thread cannot be killed, so
cancelling the local job that runs abandons it instead: its thread finishes (or stops
at its deadline, where the job checks one) with nobody waiting for it, and a fresh
thread takes the next job, so one job past its limit never holds up the rest.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from gauntlet.workers.results import JobFailure, JobResult
from gauntlet.workers.task import run_job


@dataclass
class Handle:
    job_id: int
    ref: Any


class Executor(Protocol):
    def submit(
        self, job_id: int, payload: dict, num_gpus: float, memory_mb: int | None
    ) -> Handle: ...

    def ready(self, handles: list[Handle], timeout: float, count: int = 1) -> list[Handle]:
        """Every finished handle, once ``count`` of them are (or ``timeout`` passed)."""
        ...

    def outcome(self, handle: Handle) -> JobResult | JobFailure: ...

    def cancel(self, handle: Handle) -> None: ...

    def max_gpus(self) -> float: ...


@dataclass(eq=False)  # compared by identity: two runs are never the same run
class _LocalRun:
    """A job on the local worker thread: its outcome once ``finished`` is set."""

    payload: dict
    finished: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    abandoned: bool = False


class LocalExecutor:
    """Runs jobs in this process, one at a time, on a background thread."""

    def __init__(self, gpus: float = 0.0):
        self.gpus = gpus
        self._todo: collections.deque[_LocalRun] = collections.deque()
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None  # the one thread taking new jobs
        self._current: _LocalRun | None = None

    def _start_thread(self) -> None:
        # A daemon: a scheduler that stops (SIGTERM) must not wait for a job whose
        # result it will no longer write; another replica reclaims that job.
        self._thread = threading.Thread(target=self._work, name="local-jobs", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._done:
                while self._thread is me and not self._todo:
                    self._done.wait()
                if self._thread is not me:
                    return  # retired: its job was abandoned, a fresh thread took over
                run = self._current = self._todo.popleft()
            try:
                value = run_job(run.payload)
            except Exception as exc:  # noqa: BLE001 - same classification as a failed Ray task
                value = JobFailure(message=f"{type(exc).__name__}: {exc}", permanent=False)
            with self._done:
                run.value = value
                run.finished.set()
                if self._current is run:
                    self._current = None
                self._done.notify_all()

    def submit(self, job_id, payload, num_gpus, memory_mb):
        run = _LocalRun(payload)
        with self._done:
            if self._thread is None:
                self._start_thread()
            self._todo.append(run)
            self._done.notify_all()
        return Handle(job_id, run)

    def ready(self, handles, timeout, count=1):
        def enough() -> bool:
            return sum(h.ref.finished.is_set() for h in handles) >= min(count, len(handles))

        with self._done:
            self._done.wait_for(enough, timeout)
        return [h for h in handles if h.ref.finished.is_set()]

    def outcome(self, handle):
        return handle.ref.value

    def cancel(self, handle):
        run = handle.ref
        with self._done:
            run.abandoned = True
            if run in self._todo:
                self._todo.remove(run)  # not started: simply never run
            elif self._current is run and not run.finished.is_set():
                # Running: retire its thread (it exits when the job returns) and let a
                # new one take the queue.
                self._current = None
                self._start_thread()
            self._done.notify_all()

    def max_gpus(self):
        return self.gpus


class RayExecutor:
    """Runs each job as a Ray task with the spec's GPUs (fractions allowed) and memory.

    ``transport="ray"``: workers share no filesystem with this process. An artifact
    actor on this node serves the payload's store (``cluster.artifact_actor``) and the
    payload names the actor's address instead of the path. ``"shared"``: workers read
    the path itself (one node, or a filesystem every node mounts).
    """

    def __init__(self, transport: str = "shared"):
        import ray

        self._ray = ray
        # Retries are ours (counted in Redis, visible in SQL), not Ray's.
        self._remote = ray.remote(max_retries=0)(run_job)
        self._shapes: dict[tuple, object] = {}  # (num_gpus, memory_mb) -> shaped task
        self.transport = transport
        self._server = None  # (the scheduler's store path, its address, the actor's handle)

    def _artifacts_address(self, root: str) -> str:
        if self._server is None or self._server[0] != root:
            from gauntlet.cluster.artifact_actor import start_server

            address, handle = start_server(self._ray, root)
            self._server = (root, address, handle)
        return self._server[1]

    def submit(self, job_id, payload, num_gpus, memory_mb):
        if self.transport == "ray":
            payload = dict(payload, artifacts=self._artifacts_address(payload["artifacts"]))
        return Handle(job_id, self._shaped(num_gpus, memory_mb).remote(payload))

    def _shaped(self, num_gpus: float, memory_mb: int | None):
        """The task function with these resources, made once per shape: Ray builds a
        class on every ``options`` call, which costs more than submitting a small job."""
        key = (num_gpus, memory_mb)
        if key not in self._shapes:
            options: dict = {"num_gpus": num_gpus}
            if memory_mb:
                options["memory"] = int(memory_mb) * 1024 * 1024
            self._shapes[key] = self._remote.options(**options)
        return self._shapes[key]

    def ready(self, handles, timeout, count=1):
        if not handles:
            return []
        refs = [h.ref for h in handles]
        done, _ = self._ray.wait(refs, num_returns=min(count, len(refs)), timeout=timeout)
        # Collect everything already finished, not just the first, in one more cheap call.
        if done:
            done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        done_set = set(done)
        return [h for h in handles if h.ref in done_set]

    def cancel(self, handle):
        # force: kill the worker process, whatever the task is doing (recursive by
        # default: its own children, PATE's teachers, go too).
        self._ray.cancel(handle.ref, force=True)

    def outcome(self, handle):
        try:
            return self._ray.get(handle.ref)
        except Exception as exc:  # noqa: BLE001 - a lost worker or node: transient
            cause = getattr(exc, "cause", None) or exc
            return JobFailure(message=f"{type(cause).__name__}: {cause}", permanent=False)

    def max_gpus(self):
        from gauntlet.cluster.ray_conn import largest_node_gpus

        return largest_node_gpus()
