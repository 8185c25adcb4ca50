"""The typed result a worker hands back to the scheduler.

Small, picklable dataclasses only: they travel from a Ray task to the scheduler, which
writes them to SQL in one transaction. Workers never talk to SQL themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Metric:
    """One number with its sample size and 95% interval (None where none applies)."""

    name: str
    value: float
    n: int
    low: float | None = None
    high: float | None = None


@dataclass
class JobResult:
    """What an evaluation job produced.

    ``clean`` and ``robust`` are per-example outcomes packed as bitsets (see
    ``workers.outcomes``) over the job's deterministic evaluation subset, so the worst
    case across attacks is a bitwise AND of stored rows.
    """

    metrics: list[Metric]
    n: int
    clean: bytes
    robust: bytes
    worker_host: str = ""
    device: str = ""
    code_version: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    # Pieces of the job that ran as their own tasks (``workers.fanout.SubTaskRecord``).
    subtasks: list = field(default_factory=list)


@dataclass
class JobFailure:
    """A failure the worker classified: ``permanent`` failures are not retried."""

    message: str
    permanent: bool
    worker_host: str = ""
