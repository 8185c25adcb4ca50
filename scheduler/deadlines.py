"""Time limits: every job has one, and a task past it is cancelled and its job failed.

A job's limit is its evaluation's ``timeout_s`` when the suite sets one, else its
kind's default (``JobKind.time_limit_s``: two hours for an attack, twelve for a
training run), and never more than the global cap (``GAUNTLET_MAX_JOB_SECONDS``). The
dispatcher notes when it started each task and sends the deadline along in the payload,
so a job that fans out (PATE's teachers) can hold its children to it and fail with a
message of its own. A task still running ``GRACE_S`` past its deadline is cancelled by
the dispatcher; either way the job fails for good: running it again would only hit
the same limit.
"""

from __future__ import annotations

import time

from gauntlet.workers.fanout import timed_out_message
from gauntlet.workers.jobs import job_kind

# Room for a task that enforces its own deadline (a fan-out cancelling its children)
# to report why before the dispatcher cancels it.
GRACE_S = 2.0


def limit_s(spec: dict, cap: float | None = None) -> float:
    """The job's time limit in seconds: the suite's, else its kind's, within the cap."""
    asked = spec.get("timeout_s")
    if asked is None:
        asked = job_kind(spec.get("kind", "eval")).time_limit_s
    limit = float(asked)
    return min(limit, float(cap)) if cap else limit


def stamp(payload: dict, limit: float) -> dict:
    """Put the deadline (wall clock: the task may run on another node) in the payload."""
    payload["deadline"] = time.time() + limit
    payload["time_limit_s"] = limit
    return payload


def overdue(started: float, limit: float, now: float | None = None) -> bool:
    """Whether a task started at ``started`` (monotonic) is past its limit and the grace."""
    now = time.monotonic() if now is None else now
    return now - started >= limit + GRACE_S


def message(started: float, limit: float, now: float | None = None) -> str:
    now = time.monotonic() if now is None else now
    return timed_out_message(now - started, limit)
