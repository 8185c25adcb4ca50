"""Run the pieces of one job as parallel Ray tasks, and record where each one ran.

A PATE job trains N teachers on disjoint partitions: independent pieces of work that
should run side by side on the cluster (small models take a fraction of a GPU each).
``run_parallel`` submits them as Ray tasks when the job itself runs under Ray, and
runs them one after another in this process otherwise (the local executor). Either
way each piece comes back with a ``SubTaskRecord`` (node, process, GPUs, start and end)
that the scheduler stores with the job's result.

A job that fans out should itself hold no GPU: Ray returns a blocked task's CPU while it
waits on its children, but not its GPUs, so a parent holding the only GPU would starve
its own teachers.

Children share their parent's deadline (``job_deadline``, set by the task entry from
the payload): a parent stops waiting when it passes, cancels the children still
running and fails with a timeout of its own, rather than waiting on them forever (or
until the scheduler cancels it with no word about which pieces were late). Each child
gets the deadline too, so a child that fans out again is held to the same one.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from gauntlet.cluster.errors import GauntletError

# (deadline as a wall-clock time, the limit in seconds) of the job running in this
# context; a context variable, so the local executor's threads each keep their own.
_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "gauntlet_job_deadline", default=None
)


class JobTimeout(GauntletError):
    """The job ran past its time limit: its own failure, not retried."""


def timed_out_message(elapsed: float, limit: float) -> str:
    """How a job that ran out of time says so, in the scheduler and in the worker alike."""
    return f"timed out after {elapsed:.0f} s (limit {limit:g} s)"


@contextlib.contextmanager
def job_deadline(deadline: float | None, limit: float | None) -> Iterator[None]:
    """Hold the pieces run inside to ``deadline`` (wall clock), a job's ``limit`` s."""
    if deadline is None or limit is None:
        yield
        return
    token = _DEADLINE.set((float(deadline), float(limit)))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _past_deadline() -> bool:
    current = _DEADLINE.get()
    return current is not None and time.time() >= current[0]


def _timeout(late: str) -> JobTimeout:
    deadline, limit = _DEADLINE.get()
    elapsed = time.time() - (deadline - limit)
    return JobTimeout(f"{timed_out_message(elapsed, limit)}: {late}")


@dataclass(frozen=True)
class SubTaskRecord:
    name: str
    node_id: str | None
    worker_pid: int
    gpu_ids: list
    started_at: datetime
    finished_at: datetime


def _where() -> tuple[str | None, list]:
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            gpus = context.get_accelerator_ids().get("GPU", [])
            return context.get_node_id(), [str(g) for g in gpus]
    except Exception:  # noqa: BLE001 - where a piece ran is a label, never a failure
        pass
    return None, []


def _recorded(
    name: str, fn: Callable, args: tuple, deadline: tuple[float, float] | None = None
) -> tuple[Any, SubTaskRecord]:
    started = datetime.now(timezone.utc)
    with job_deadline(*(deadline or (None, None))):
        value = fn(*args)
    node, gpus = _where()
    record = SubTaskRecord(name, node, os.getpid(), gpus, started, datetime.now(timezone.utc))
    return value, record


def _under_ray() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def run_parallel(
    fn: Callable,
    pieces: Sequence[tuple[str, tuple]],
    *,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    on_done: Callable[[int, int], None] | None = None,
) -> tuple[list[Any], list[SubTaskRecord]]:
    """``fn(*args)`` for every ``(name, args)``: values in order, and their records.

    Under Ray each piece is a task with ``num_gpus`` (fractions allowed) and
    ``num_cpus``; a piece that raises fails the whole call with its exception.
    ``on_done(finished, total)`` is called as pieces finish (a job's progress). Past
    the job's deadline, pieces still running are cancelled and ``JobTimeout`` raised.
    """
    total = len(pieces)
    deadline = _DEADLINE.get()
    if not _under_ray():
        outputs = []
        for i, (name, args) in enumerate(pieces):
            # In-process a running piece cannot be stopped; one not started need not be.
            if _past_deadline():
                raise _timeout(f"{total - i} of {total} sub-tasks had not started")
            outputs.append(_recorded(name, fn, args, deadline))
            if on_done:
                on_done(len(outputs), total)
    else:
        import ray

        available = ray.cluster_resources().get("GPU", 0.0)
        if num_gpus > available:
            # Ray would queue such tasks forever; say so instead.
            raise GauntletError(
                f"each sub-task asks for {num_gpus:g} GPUs, but the cluster has {available:g}"
            )
        remote = ray.remote(max_retries=0)(_recorded).options(num_gpus=num_gpus, num_cpus=num_cpus)
        refs = [remote.remote(name, fn, args, deadline) for name, args in pieces]
        position = {ref: i for i, ref in enumerate(refs)}
        outputs = [None] * total
        waiting = list(refs)
        while waiting:
            timeout = None if deadline is None else max(0.0, deadline[0] - time.time())
            finished, waiting = ray.wait(waiting, num_returns=1, timeout=timeout)
            if not finished:
                if not _past_deadline():
                    continue  # woke a moment early
                _cancel_late(ray, waiting, [pieces[position[r]][0] for r in waiting], total)
            outputs[position[finished[0]]] = ray.get(finished[0])  # raises if it failed
            if on_done:
                on_done(total - len(waiting), total)
    return [value for value, _ in outputs], [record for _, record in outputs]


def _cancel_late(ray, refs: list, names: list[str], total: int) -> None:
    """Cancel the pieces still running at the deadline, and fail the job saying which."""
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - finished meanwhile: nothing left to stop
            pass
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise _timeout(f"{len(names)} of {total} sub-tasks were still running, cancelled ({shown})")
