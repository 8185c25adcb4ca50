"""Per-account quotas of the HTTP API: submissions per day, GPU-hours per month.

Both windows are rolling (the last 24 hours, the last 30 days), so a quota never
resets all at once at midnight for everyone. A submission is a new model owned by the
account. A job's GPU-hours are its wall time, from ``started_at`` to ``finished_at``
(to now while it runs), times the GPUs its spec asks for; a job counts in the window
it started in. Admins and the local operator have no quota.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from gauntlet.cluster.settings import Settings
from gauntlet.db.schema import Job, Model, utcnow
from gauntlet.scheduler.accounts import QuotaExceeded, Viewer

DAY = timedelta(days=1)
MONTH = timedelta(days=30)


# What each quota's message says was used.
_QUOTAS = {
    "SUBMISSIONS_PER_DAY": "submission quota reached: {used} models submitted in the last 24 hours",
    "GPU_HOURS_PER_MONTH": "GPU-hour quota reached: {used:.2f} GPU-hours used in the last 30 days",
}


def submissions_today(engine: sa.Engine, user_id: int, now=None) -> int:
    now = now or utcnow()
    stmt = sa.select(sa.func.count()).where(
        Model.owner_id == user_id, Model.created_at >= now - DAY
    )
    with engine.connect() as conn:
        return int(conn.scalar(stmt) or 0)


def requested_gpus(spec) -> float:
    """The GPUs a job's spec asks for (0 when it names none, or nonsense)."""
    resources = (spec or {}).get("resources") or {}
    try:
        return max(float(resources.get("num_gpus") or 0.0), 0.0)
    except (TypeError, ValueError):
        return 0.0


def gpu_hours_this_month(engine: sa.Engine, user_id: int, now=None) -> float:
    """Wall time x GPUs over the account's jobs that started in the last 30 days."""
    now = now or utcnow()
    stmt = (
        sa.select(Job.started_at, Job.finished_at, Job.spec)
        .join(Model, Model.id == Job.model_id)
        .where(Model.owner_id == user_id, Job.started_at >= now - MONTH)
    )
    seconds = 0.0
    with engine.connect() as conn:
        for started, finished, spec in conn.execute(stmt):
            wall = ((finished or now) - started).total_seconds()
            seconds += max(wall, 0.0) * requested_gpus(spec)
    return seconds / 3600.0


def usage(engine: sa.Engine, settings: Settings, viewer: Viewer) -> dict:
    """What the account used and may use, as ``GET /api/me`` shows it."""
    if viewer.id is None:
        return {}
    return {
        "submissions_today": submissions_today(engine, viewer.id),
        "submissions_per_day": None if viewer.is_admin else settings.quota_submissions_per_day,
        "gpu_hours_this_month": round(gpu_hours_this_month(engine, viewer.id), 6),
        "gpu_hours_per_month": None if viewer.is_admin else settings.quota_gpu_hours_per_month,
    }


def check(engine: sa.Engine, settings: Settings, viewer: Viewer, *, submitting: bool) -> None:
    """Refuse work past either quota, naming the quota, its setting and the usage."""
    if viewer.is_admin or viewer.id is None:
        return
    limits = [(gpu_hours_this_month(engine, viewer.id), "GPU_HOURS_PER_MONTH")]
    if submitting:
        limits.insert(0, (submissions_today(engine, viewer.id), "SUBMISSIONS_PER_DAY"))
    for used, quota in limits:
        allowed = getattr(settings, f"quota_{quota.lower()}")
        if used >= allowed:
            what = _QUOTAS[quota].format(used=used)
            raise QuotaExceeded(f"{what}, the most allowed is {allowed:g} (GAUNTLET_QUOTA_{quota})")
