"""Engines, sessions and Alembic migrations.

The Alembic configuration is built in code with the script location inside this
package, so ``upgrade`` works the same from a checkout and from an installed wheel.
The migration environment takes its connection from ``Config.attributes``: callers
migrate through their own engine, which keeps settings carried by the URL (such as a
PostgreSQL ``search_path`` in ``options``) and SQLite's pragmas.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.orm import Session, sessionmaker

from gauntlet.cluster.errors import GauntletError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Several processes write the embedded database at once (submit CLI, schedulers):
# wait for the write lock rather than fail with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Any constant works; it only has to be the same for every gauntlet process.
_PG_MIGRATION_LOCK = 0x6761756E  # "gaun"


# libpq parameters: give up connecting after 10 s; probe an idle connection after 10 s,
# every 5 s, and drop it after 3 unanswered probes.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def _on_sqlite_connect(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ignores foreign keys (and ON DELETE CASCADE) unless asked, per connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL lets readers (leaderboard, `gauntlet jobs`) run while a scheduler writes. It
    # sticks to the file, so this is a no-op after the first connection (":memory:"
    # databases answer "memory" and stay as they are).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def make_engine(url: str | sa.URL) -> sa.Engine:
    """An engine for ``url``; SQLite gets its directory, foreign keys, a busy timeout, WAL."""
    url = sa.make_url(url)
    if url.get_backend_name() == "postgresql":
        # pool_pre_ping: schedulers live for days and PostgreSQL restarts underneath.
        # A connect timeout and TCP keep-alives: a partitioned server (packets dropped,
        # nothing refused) must end a call with an error within about half a minute,
        # which the scheduler rides through, instead of hanging it.
        return sa.create_engine(url, pool_pre_ping=True, connect_args=POSTGRES_CONNECT_ARGS)
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        # The embedded default lives under GAUNTLET_HOME, which may not exist yet.
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    sa.event.listen(engine, "connect", _on_sqlite_connect)
    return engine


def session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: callers read attributes after the transaction ended.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """The Alembic configuration of the package's migrations, built in code."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the package ships no migrations"
    return head


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def current_revision(engine: sa.Engine) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url_or_engine: str | sa.URL | sa.Engine) -> None:
    """Bring the database to the head revision (``alembic upgrade head``).

    Two processes may upgrade at once (say two schedulers starting on a fresh SQLite
    file). Each takes a database-wide lock first and then lets Alembic look at the
    revision, so the second one finds the work done instead of creating tables twice.
    """
    owned = not isinstance(url_or_engine, sa.Engine)
    engine = make_engine(url_or_engine) if owned else url_or_engine
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                # The driver's implicit BEGIN is deferred; take the write lock now. The
                # DDL then runs inside this transaction (SQLite's DDL is transactional).
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif engine.dialect.name == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                )
            command.upgrade(alembic_config(conn), "head")
            conn.commit()
    finally:
        if owned:
            engine.dispose()


def display_url(url: str | sa.URL) -> str:
    """The URL without its password, fit for messages and logs."""
    url = sa.make_url(url)
    # URL.set(password=None) keeps the password; build the URL again without one.
    bare = sa.URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    )
    return bare.render_as_string(hide_password=False)


def open_database(url: str | sa.URL, *, auto_upgrade: bool | None = None) -> sa.Engine:
    """An engine on a database at the head revision.

    The embedded SQLite database is created and upgraded on first use (``auto_upgrade``
    defaults to True for SQLite). A server database is shared by many processes, so an
    operator upgrades it on purpose: unless ``auto_upgrade=True`` we refuse to run
    against an out-of-date schema rather than migrate it behind everyone's back.
    """
    url = sa.make_url(url)
    if auto_upgrade is None:
        auto_upgrade = url.get_backend_name() == "sqlite"
    engine = make_engine(url)
    try:
        current, head = current_revision(engine), head_revision()
        if current == head:
            return engine
        if current is not None and not _known(current):
            # A newer gauntlet migrated this database; downgrading it is not our call.
            raise GauntletError(
                f"database at {display_url(url)} is at revision {current}, which this "
                f"version of gauntlet does not know (its newest is {head}): upgrade gauntlet"
            )
        if auto_upgrade:
            upgrade(engine)
            return engine
        raise GauntletError(
            f"database at {display_url(url)} is at revision {current or 'none (empty)'}, "
            f"expected {head}: run `gauntlet db upgrade`"
        )
    except BaseException:
        engine.dispose()
        raise
