"""The leaderboard's SQL schema (SQLAlchemy 2.0 declarative).

The same tables run on SQLite (the embedded default) and PostgreSQL (the cluster), so
everything here is portable: enums are strings with a CHECK constraint, JSON is the
generic JSON type, and timestamps go through ``UTCDateTime`` so that lease expiry
compares the same way on both backends. The migrations (``0001_initial`` and the
later ones) create exactly these tables; a test keeps the two in step.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names: migrations can refer to them, and they read the same
# on every backend (PostgreSQL would otherwise pick its own names, SQLite none at all).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zones: it stores the text of the datetime and drops tzinfo. We
    therefore convert every value to UTC on the way in (so the stored text is naive UTC
    and string comparison is time comparison) and attach UTC on the way out. Naive
    datetimes are refused: a naive local time would compare wrongly against leases.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"Expected a timezone-aware datetime, but got naive {value!r}")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


def _enum_values(enum_type: type[enum.Enum]) -> list[str]:
    return [member.value for member in enum_type]


# Stored as VARCHAR + CHECK (not a native PostgreSQL enum) so that adding a state later
# is a plain constraint change on both backends.
JOB_STATUS_TYPE = sa.Enum(
    JobStatus,
    name="job_status",
    native_enum=False,
    create_constraint=True,
    length=16,
    values_callable=_enum_values,
    validate_strings=True,
)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON()}


class Model(Base):
    """A submitted classifier, content-addressed by a key the caller computes."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    arch: Mapped[str] = mapped_column(sa.String(100))
    dataset: Mapped[str] = mapped_column(sa.String(100))
    input_spec: Mapped[dict[str, Any]]
    weights_sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Lineage: a training-time defense produces a new model derived from this one.
    parent_id: Mapped[str | None] = mapped_column(sa.ForeignKey("models.id"))
    # What the service did to the submission, e.g. "weights converted from float16 to
    # float32", so the leaderboard's number is not mistaken for the file's own precision.
    note: Mapped[str | None] = mapped_column(sa.Text)
    # The submitter's model card (claimed numbers, authors, venue), kept beside the
    # measured results; None when the model came without one.
    card: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    # The account that submitted it through the API (None: the local CLI, no account),
    # and whether everyone may see it. An account's model stays private until published.
    owner_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    public: Mapped[bool] = mapped_column(default=True, server_default=sa.true())


class Job(Base):
    """One evaluation (model x attack x defense x dataset subset) and its lifecycle."""

    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("job_key"),
        sa.Index("ix_jobs_status", "status"),
        sa.Index("ix_jobs_model_id", "model_id"),
        sa.Index("ix_jobs_group", "dataset", "norm", "eps", "subset_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_key: Mapped[str] = mapped_column(sa.String(64))
    model_id: Mapped[str] = mapped_column(sa.ForeignKey("models.id"))
    kind: Mapped[str] = mapped_column(sa.String(32))
    # 200, like every user-given name (a suite may be a path to the user's YAML file).
    suite: Mapped[str | None] = mapped_column(sa.String(200))
    spec: Mapped[dict[str, Any]]
    # Denormalised from the spec so the leaderboard can group in SQL.
    dataset: Mapped[str] = mapped_column(sa.String(100))
    attack: Mapped[str] = mapped_column(sa.String(100))
    norm: Mapped[str | None] = mapped_column(sa.String(16))
    eps: Mapped[float | None] = mapped_column(sa.Float)
    subset_key: Mapped[str] = mapped_column(sa.String(200))
    # The defense's configuration (its repr) when the model is evaluated behind one, and
    # the surrogate of a transfer job. Leaderboard entries are (model, defense) pairs.
    defense: Mapped[str | None] = mapped_column(sa.String(200))
    source_model_id: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[JobStatus] = mapped_column(
        JOB_STATUS_TYPE, default=JobStatus.queued, server_default=JobStatus.queued.value
    )
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    # The job's own transient failures (as opposed to deliveries of its stream entry).
    failures: Mapped[int] = mapped_column(default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[datetime | None]
    # Set once the job id is on the Redis stream; NULL means it still needs enqueueing.
    stream_id: Mapped[str | None] = mapped_column(sa.String(64))
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker_host: Mapped[str | None] = mapped_column(sa.String(200))
    device: Mapped[str | None] = mapped_column(sa.String(100))
    code_version: Mapped[str | None] = mapped_column(sa.String(100))
    seconds: Mapped[float | None] = mapped_column(sa.Float)
    # What the worker reports beside metrics: reliability flags, the adaptations used
    # (BPDA, EOT), the attack's resolved configuration, robustness curves.
    details: Mapped[dict[str, Any] | None]


class MetricRow(Base):
    """One named number of a finished job, with its sample size and 95% interval."""

    __tablename__ = "metrics"
    __table_args__ = (sa.UniqueConstraint("job_id", "name", name="uq_metrics_job_id_name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(100))
    value: Mapped[float] = mapped_column(sa.Float)
    n: Mapped[int]
    ci_low: Mapped[float | None] = mapped_column(sa.Float)
    ci_high: Mapped[float | None] = mapped_column(sa.Float)


class Outcome(Base):
    """Per-example outcomes of a finished job as packed bitsets (workers.results)."""

    __tablename__ = "outcomes"

    job_id: Mapped[int] = mapped_column(
        sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    n: Mapped[int]
    clean: Mapped[bytes] = mapped_column(sa.LargeBinary)
    robust: Mapped[bytes] = mapped_column(sa.LargeBinary)


class SubTask(Base):
    """One piece of a job that ran as its own task (a PATE teacher): where and when.

    A job that fans out (teachers trained in parallel) records each piece, so whether
    they really ran in parallel, and on which node and GPU, is visible in SQL.
    """

    __tablename__ = "subtasks"
    __table_args__ = (sa.UniqueConstraint("job_id", "name", name="uq_subtasks_job_id_name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    node_id: Mapped[str | None] = mapped_column(sa.String(100))
    worker_pid: Mapped[int | None]
    gpu_ids: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)


class User(Base):
    """An account of the HTTP API; admins see and operate every model."""

    __tablename__ = "users"
    __table_args__ = (sa.UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Token(Base):
    """An API token: only its hash is kept, found through its public prefix.

    The prefix is random and unique, so a request's token is looked up by an indexed
    equality and then checked against one hash, never compared with every stored one.
    """

    __tablename__ = "tokens"
    __table_args__ = (sa.UniqueConstraint("prefix"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(sa.String(32))
    hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[datetime | None]
