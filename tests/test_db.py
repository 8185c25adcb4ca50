"""Schema, sessions and migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gauntlet.cluster.errors import GauntletError
from gauntlet.db import Base, Job, Model, current_revision, head_revision, open_database, upgrade
from gauntlet.db.session import display_url, make_engine, session_factory


@pytest.fixture
def engine(db_url: str):
    engine = open_database(db_url, auto_upgrade=True)
    yield engine
    engine.dispose()


def _model(**overrides) -> Model:
    values = dict(
        id="m" * 64,
        name="net",
        arch="mlp",
        dataset="digits",
        input_spec={"channels": 1, "mean": [0.5]},
        weights_sha256="w" * 64,
    )
    return Model(**{**values, **overrides})


def _job(key: str, model_id: str = "m" * 64) -> Job:
    return Job(
        job_key=key,
        model_id=model_id,
        kind="eval",
        spec={"attack": "pgd"},
        dataset="digits",
        attack="pgd",
        norm="linf",
        eps=0.1,
        subset_key="digits:test:20:0",
    )


def test_upgrade_brings_an_empty_database_to_head(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision() == "0006"
        upgrade(db_url)  # a second upgrade finds nothing to do
        assert current_revision(engine) == "0006"
        tables = set(sa.inspect(engine).get_table_names())
        assert {"models", "jobs", "metrics", "outcomes", "subtasks", "alembic_version"} <= tables
    finally:
        engine.dispose()


def test_metadata_matches_the_migrated_schema(engine: sa.Engine) -> None:
    inspector = sa.inspect(engine)
    for table in Base.metadata.sorted_tables:
        migrated = {column["name"]: column for column in inspector.get_columns(table.name)}
        assert set(migrated) == set(table.columns.keys()), table.name
        for column in table.columns:
            assert migrated[column.name]["nullable"] == column.nullable, (table.name, column.name)
        indexes = {ix["name"] for ix in inspector.get_indexes(table.name)}
        assert {ix.name for ix in table.indexes} <= indexes
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []


def test_open_database_upgrades_embedded_sqlite_and_creates_its_directory(tmp_path) -> None:
    path = tmp_path / "state" / "nested" / "gauntlet.db"
    engine = open_database(f"sqlite:///{path}")
    try:
        assert path.is_file()
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_open_database_refuses_an_out_of_date_server_schema(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        with pytest.raises(GauntletError, match="gauntlet db upgrade"):
            open_database(db_url, auto_upgrade=False)
        return
    with pytest.raises(GauntletError) as raised:
        open_database(db_url)
    message = str(raised.value)
    assert "is at revision none (empty), expected 0006: run `gauntlet db upgrade`" in message
    upgrade(db_url)
    open_database(db_url).dispose()


def test_open_database_refuses_a_revision_from_a_newer_gauntlet(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    with pytest.raises(GauntletError, match="revision f00d, which this version of gauntlet"):
        open_database(db_url, auto_upgrade=True)


def test_display_url_drops_the_password() -> None:
    shown = display_url("postgresql+psycopg://alice:s3cret@db.example:5432/board")
    assert "s3cret" not in shown
    assert shown == "postgresql+psycopg://alice@db.example:5432/board"


def test_job_key_is_unique_and_foreign_keys_hold(engine: sa.Engine) -> None:
    sessions = session_factory(engine)
    with sessions.begin() as session:
        session.add(_model())
        session.flush()  # no relationship() orders the inserts: the model goes first
        session.add(_job("k1"))
    with pytest.raises(sa.exc.IntegrityError), sessions.begin() as session:
        session.add(_job("k1"))
    # SQLite enforces foreign keys only when asked: make_engine asks on every connection.
    with pytest.raises(sa.exc.IntegrityError), sessions.begin() as session:
        session.add(_job("k2", model_id="nobody"))
    with pytest.raises(sa.exc.StatementError), sessions.begin() as session:
        session.execute(sa.update(Job).values(status="sleeping"))


def test_timestamps_come_back_as_utc_and_compare_across_zones(engine: sa.Engine) -> None:
    plus_two = timezone(timedelta(hours=2))
    stamp = datetime(2024, 5, 1, 14, 0, tzinfo=plus_two)  # 12:00 UTC
    sessions = session_factory(engine)
    with sessions.begin() as session:
        session.add(_model())
        session.flush()
        job = _job("k1")
        job.lease_expires_at = stamp
        session.add(job)
    with sessions() as session:
        loaded = session.scalars(sa.select(Job)).one()
        assert loaded.lease_expires_at == stamp
        assert loaded.lease_expires_at.utcoffset() == timedelta(0)
        assert loaded.created_at.tzinfo is not None
        at_1159_utc = datetime(2024, 5, 1, 11, 59, tzinfo=timezone.utc)
        at_1201_utc = datetime(2024, 5, 1, 12, 1, tzinfo=timezone.utc)
        assert session.scalar(sa.select(sa.func.count()).where(Job.lease_expires_at < at_1201_utc))
        assert not session.scalar(
            sa.select(sa.func.count()).where(Job.lease_expires_at < at_1159_utc)
        )
    with pytest.raises(sa.exc.StatementError, match="timezone-aware"), sessions() as session:
        session.execute(sa.select(Job).where(Job.started_at < datetime(2024, 1, 1))).all()


def _upgrade_in_child(db_url: str) -> None:
    upgrade(db_url)


def test_concurrent_upgrades_create_the_schema_once(db_url: str) -> None:
    # Several schedulers starting at once on a fresh database all run upgrade(). Forked
    # processes (not threads: Alembic's context is process-global) race for real.
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_upgrade_in_child, args=(db_url,)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0, 0, 0]
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
