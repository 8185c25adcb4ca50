"""A named Redis lease with fencing tokens, so two `gauntlet nightly` runs never overlap.

The lease is one key set with NX and an expiry: a holder that dies frees it when the
TTL runs out. Each acquisition first takes a fresh token from a counter that never
expires, so tokens only grow; a holder that stalled past its TTL can ask
``check_fence`` before a write and learn that someone newer holds the lease.
"""

from __future__ import annotations

import redis

from gauntlet.cluster.errors import GauntletError

# Extend or delete the lease only while it still holds our token: a holder whose lease
# expired must not prolong or free the lease of whoever took it next.
_EXTEND_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _lease_key(prefix: str, name: str) -> str:
    return f"{prefix}:lease:{name}"


class Lease:
    """``with Lease(client, "nightly", ttl_ms, prefix=...):`` or acquire/extend/release."""

    def __init__(self, client: redis.Redis, name: str, ttl_ms: int, *, prefix: str) -> None:
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
            raise GauntletError(f"Expected `ttl_ms` to be a positive integer, but got {ttl_ms!r}")
        self.client = client
        self.name = name
        self.ttl_ms = ttl_ms
        self.key = _lease_key(prefix, name)
        self.fence_key = f"{self.key}:fence"
        self.token: int | None = None
        self._extend = client.register_script(_EXTEND_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)

    def acquire(self) -> int | None:
        """Take the lease; returns our fencing token, or None while someone holds it.

        A failed attempt still uses up a token; that is harmless, tokens need only grow.
        """
        token = int(self.client.incr(self.fence_key))
        if self.client.set(self.key, token, nx=True, px=self.ttl_ms):
            self.token = token
            return token
        return None

    def extend(self) -> bool:
        """Restart the TTL; False if the lease is no longer ours (expired, taken over)."""
        if self.token is None:
            return False
        return bool(self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        """Give the lease up if it is still ours; a lease already lost is left alone."""
        if self.token is not None:
            self._release(keys=[self.key], args=[self.token])
            self.token = None

    def remaining_ms(self) -> int:
        """Milliseconds until the current holder's lease expires (0 if none is held)."""
        return max(int(self.client.pttl(self.key)), 0)

    def __enter__(self) -> Lease:
        if self.acquire() is None:
            raise GauntletError(
                "another `gauntlet nightly` holds the lease until it finishes or "
                f"expires ({self.remaining_ms()} ms left)"
            )
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def check_fence(client: redis.Redis, name: str, token: int | None, *, prefix: str) -> bool:
    """Whether ``token`` is still the current holder's: the lease key holds exactly it."""
    if token is None:
        return False
    value = client.get(_lease_key(prefix, name))
    if isinstance(value, bytes):
        value = value.decode()
    return value == str(token)
