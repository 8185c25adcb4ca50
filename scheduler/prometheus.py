"""Prometheus metrics of a scheduler: what an operator's monitoring scrapes.

Every number is read at scrape time from the shared state (SQL and the Redis stream),
not counted in this process, so any scheduler replica answers for the whole cluster and
a restarted one loses nothing. A scrape during an outage reports what it can read and
``gauntlet_scrape_errors`` names the service that failed; it never raises into the
scheduler, which keeps its own back-off.

Metrics (all prefixed ``gauntlet_``):

- ``jobs{status,kind}``: jobs per status and kind;
- ``queue_length``: entries on the stream (waiting or in flight; acking deletes);
- ``queue_pending``: entries delivered to a scheduler and not yet acknowledged;
- ``queue_dead_letters``: entries moved to the dead-letter stream;
- ``job_duration_seconds{kind}``: a histogram of finished jobs' run times;
- ``gpu_seconds_total{kind}``: run time x GPUs requested, over finished jobs.
"""

from __future__ import annotations

import sqlalchemy as sa
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job
from gauntlet.scheduler.outage import service_of
from gauntlet.scheduler.quotas import requested_gpus

# Seconds; a job takes from under a second (clean accuracy) to hours (AutoAttack).
BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
FINISHED = ("done", "failed")


class SchedulerCollector:
    """A custom collector: ``collect`` runs the queries on each scrape."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        errors = GaugeMetricFamily(
            "gauntlet_scrape_errors",
            "1 when this scrape could not read a service",
            labels=["service"],
        )
        for service, read in (("database", self._sql), ("redis", self._redis)):
            try:
                yield from read()
                errors.add_metric([service], 0)
            except Exception as exc:  # noqa: BLE001 - an outage is reported, never raised
                # GauntletError: the first connection to a service failed.
                if service_of(exc) is None and not isinstance(exc, GauntletError):
                    raise
                errors.add_metric([service], 1)
        yield errors

    def _sql(self):
        jobs = GaugeMetricFamily(
            "gauntlet_jobs", "jobs by status and kind", labels=["status", "kind"]
        )
        counts = sa.select(Job.status, Job.kind, sa.func.count()).group_by(Job.status, Job.kind)
        finished = sa.select(Job.kind, Job.seconds, Job.spec).where(
            Job.status.in_(FINISHED), Job.seconds.is_not(None)
        )
        per_kind: dict[str, list[float]] = {}
        gpu_seconds: dict[str, float] = {}
        with self.app.engine.connect() as conn:
            for status, kind, n in conn.execute(counts):
                jobs.add_metric([str(getattr(status, "value", status)), kind], int(n))
            for kind, seconds, spec in conn.execute(finished):
                per_kind.setdefault(kind, []).append(float(seconds))
                gpu_seconds[kind] = gpu_seconds.get(kind, 0.0) + float(seconds) * requested_gpus(
                    spec
                )
        yield jobs
        durations = HistogramMetricFamily(
            "gauntlet_job_duration_seconds", "run time of finished jobs", labels=["kind"]
        )
        for kind, values in sorted(per_kind.items()):
            cumulative = [(f"{b:g}", sum(v <= b for v in values)) for b in BUCKETS]
            buckets = [*cumulative, ("+Inf", len(values))]
            durations.add_metric([kind], buckets, sum_value=sum(values))
        yield durations
        gpu = CounterMetricFamily(
            "gauntlet_gpu_seconds", "run time x GPUs requested, finished jobs", labels=["kind"]
        )
        for kind, seconds in sorted(gpu_seconds.items()):
            gpu.add_metric([kind], seconds)
        yield gpu

    def _redis(self):
        queue = self.app.queue
        queue.ensure_group()
        client = queue.client
        yield GaugeMetricFamily(
            "gauntlet_queue_length",
            "entries on the job stream",
            value=int(client.xlen(queue.stream)),
        )
        yield GaugeMetricFamily(
            "gauntlet_queue_pending",
            "entries delivered and not yet acknowledged",
            value=queue.pending(),
        )
        yield GaugeMetricFamily(
            "gauntlet_queue_dead_letters",
            "entries on the dead-letter stream",
            value=int(client.xlen(queue.dead_stream)),
        )


def registry_for(app) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(app))
    return registry


def start_metrics_server(app, port: int, addr: str = "0.0.0.0"):
    """Serve ``/metrics`` on ``port`` from a daemon thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    try:
        return start_http_server(port, addr=addr, registry=registry_for(app))
    except OSError as exc:  # the port is taken, or not ours to bind
        raise GauntletError(
            f"cannot serve metrics on port {port} (GAUNTLET_METRICS_PORT): {exc}"
        ) from None
