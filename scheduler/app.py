"""The service's parts for one process, opened lazily from Settings.

The CLI, the demo and the tests build one ``App``; a command touches only what it
needs (``gauntlet leaderboard`` never starts Redis or Ray).
"""

from __future__ import annotations

from functools import cached_property

from gauntlet.cluster import redis_conn
from gauntlet.cluster.settings import Settings
from gauntlet.db.session import open_database
from gauntlet.scheduler.queue import JobQueue


class App:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()

    @cached_property
    def engine(self):
        self.settings.ensure_home()
        return open_database(self.settings.db_url)

    @cached_property
    def redis(self):
        self.settings.ensure_home()
        return redis_conn.connect(self.settings)

    @cached_property
    def queue(self) -> JobQueue:
        return JobQueue(
            self.redis, self.settings.redis_prefix, max_deliveries=self.settings.max_deliveries
        )

    def payload_base(self) -> dict:
        """What every worker needs to find its inputs and report progress."""
        return {
            "artifacts": str(self.settings.artifacts),
            "data_root": str(self.settings.data_root),
            "keep_adversarial": self.settings.keep_adversarial,
            "redis_url": redis_conn.worker_url(self.settings),
        }

    def dispatcher(self, executor, *, max_in_flight: int | None = None, on_event=None):
        from gauntlet.scheduler.dispatcher import Dispatcher

        return Dispatcher(
            self.engine,
            self.queue,
            executor,
            payload_base=self.payload_base(),
            lease_seconds=self.settings.lease_seconds,
            max_in_flight=max_in_flight or self.settings.max_in_flight,
            progress_prefix=self.settings.redis_prefix,
            on_event=on_event,
            max_job_seconds=self.settings.max_job_seconds,
            followups=self.settings.followups,
            reconnect_seconds=(
                self.settings.reconnect_min_seconds,
                self.settings.reconnect_max_seconds,
            ),
        )

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
