"""Riding through a Redis or database outage: which service failed, and when to try again.

A scheduler lives for days; Redis restarts, PostgreSQL fails over, a network link
drops. None of that is the fault of the jobs it runs, so none of it may stop the loop
or fail a job. The dispatcher asks ``Links`` before each step whether the services that
step needs are reachable, and tells it when a call failed because one was not. A
service that failed is *down* until a probe (a PING, a ``SELECT 1``) answers again:
only the probe ends an outage, so one outage logs one warning when it starts and one
line with its length when it ends, however many calls failed in between. Probes are
spaced by a capped exponential back-off, so a long outage costs a call every few
seconds, not a busy loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

REDIS = "Redis"
DATABASE = "the database"

# Replies of a Redis that answers but cannot serve: out of memory, unable to persist,
# its primary lost, a failover under way.
_REDIS_UNAVAILABLE = ("OOM", "MISCONF", "MASTERDOWN", "TRYAGAIN")


def service_of(exc: BaseException) -> str | None:
    """The service an error says is unreachable (``REDIS``, ``DATABASE``), or None.

    Redis loading its data after a restart (BusyLoadingError) is a ConnectionError too,
    and a replica promoted late (READONLY) will take writes again: both count.
    """
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)):
        return REDIS
    if isinstance(exc, redis.ResponseError) and str(exc).startswith(_REDIS_UNAVAILABLE):
        return REDIS  # up, but refusing writes for now: as good as away
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return DATABASE
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return DATABASE
    return None


def fail_fast(client: redis.Redis) -> None:
    """Let a client retry a command once (a stale pooled connection), not for seconds.

    The client's own default retries a failed command ten times with a back-off; the
    dispatcher backs off itself and has other work to do meanwhile (renewing its
    leases in SQL while Redis is away), so it wants to hear at once.
    """
    client.set_retry(Retry(NoBackoff(), 1))


@dataclass
class _Link:
    probe: Callable[[], object]
    since: float | None = None  # when the outage started (monotonic); None while up
    delay: float = 0.0
    retry_at: float = 0.0
    error: str = ""


class Links:
    """The state of the scheduler's two services, and the back-off of their probes."""

    def __init__(
        self,
        probes: dict[str, Callable[[], object]],
        *,
        first_delay: float = 0.1,
        max_delay: float = 5.0,
        on_recovered: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.first_delay = first_delay
        self.max_delay = max(max_delay, first_delay)
        self.on_recovered = on_recovered
        self.clock = clock
        self._links = {name: _Link(probe) for name, probe in probes.items()}
        self.outages = 0  # outages seen so far, of either service

    def up(self, *services: str) -> bool:
        return all(self._links[s].since is None for s in services)

    def down(self) -> list[str]:
        return [name for name, link in self._links.items() if link.since is not None]

    def lost(self, service: str, exc: BaseException) -> None:
        """A call failed because ``service`` is unreachable; the first failure logs."""
        link = self._links[service]
        if link.since is not None:
            return  # the outage is known; its probes keep the back-off
        link.since = self.clock()
        link.delay = self.first_delay
        link.retry_at = link.since + link.delay
        link.error = f"{type(exc).__name__}: {exc}"
        self.outages += 1
        log.warning(
            "%s is unreachable (%s); keeping running jobs and their results, retrying",
            service,
            " ".join(link.error.split()),
        )

    def guard(self, service_error: BaseException) -> bool:
        """Record ``service_error`` if it is an outage; False when it is something else."""
        service = service_of(service_error)
        if service is None:
            return False
        self.lost(service, service_error)
        return True

    def probe(self) -> list[str]:
        """Probe each service whose retry is due; the ones that answered again."""
        back = []
        for name, link in self._links.items():
            if link.since is None or self.clock() < link.retry_at:
                continue
            try:
                link.probe()
            except Exception as exc:  # noqa: BLE001 - any failure: still down
                if service_of(exc) is None:
                    log.debug("probing %s failed", name, exc_info=True)
                link.delay = min(link.delay * 2, self.max_delay)
                link.retry_at = self.clock() + link.delay
                continue
            lasted = self.clock() - link.since
            link.since = None
            log.warning("%s is reachable again after an outage of %.1f s", name, lasted)
            back.append(name)
            if self.on_recovered:
                self.on_recovered(name, lasted)
        return back

    def next_probe_in(self) -> float:
        """Seconds until the next due probe (0 if one is due; inf if all are up)."""
        links = self._links.values()
        waits = [link.retry_at - self.clock() for link in links if link.since is not None]
        return max(0.0, min(waits)) if waits else float("inf")
