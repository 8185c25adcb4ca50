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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from gauntlet.cluster.errors import GauntletError


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


def _recorded(name: str, fn: Callable, args: tuple) -> tuple[Any, SubTaskRecord]:
    started = datetime.now(timezone.utc)
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
    ``on_done(finished, total)`` is called as pieces finish (a job's progress).
    """
    total = len(pieces)
    if not _under_ray():
        outputs = []
        for name, args in pieces:
            outputs.append(_recorded(name, fn, args))
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
        refs = [remote.remote(name, fn, args) for name, args in pieces]
        position = {ref: i for i, ref in enumerate(refs)}
        outputs = [None] * total
        waiting = list(refs)
        while waiting:
            (finished,), waiting = ray.wait(waiting, num_returns=1)
            outputs[position[finished]] = ray.get(finished)  # raises if the piece failed
            if on_done:
                on_done(total - len(waiting), total)
    return [value for value, _ in outputs], [record for _, record in outputs]
