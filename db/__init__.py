"""The leaderboard database: schema, engines and sessions, Alembic migrations."""

from gauntlet.db.schema import Base, Job, JobStatus, MetricRow, Model, Outcome
from gauntlet.db.session import (
    current_revision,
    head_revision,
    make_engine,
    open_database,
    session_factory,
    upgrade,
)

__all__ = [
    "Base",
    "Job",
    "JobStatus",
    "MetricRow",
    "Model",
    "Outcome",
    "current_revision",
    "head_revision",
    "make_engine",
    "open_database",
    "session_factory",
    "upgrade",
]
