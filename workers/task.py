"""The function a Ray task (or the local executor) runs for one job.

It classifies failures at the source: ``GauntletError`` (the submitter's problem, or a
job that ran out of time) comes back as a permanent ``JobFailure``; anything else
propagates, and the scheduler treats it as transient (a lost node, an out-of-memory
kill) and retries. The payload's deadline holds whatever the job fans out to it.
"""

from __future__ import annotations

import functools
import socket

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import provenance
from gauntlet.workers.context import JobContext
from gauntlet.workers.fanout import job_deadline
from gauntlet.workers.jobs import job_kind
from gauntlet.workers.results import JobFailure, JobResult

PROGRESS_TTL_S = 3600


@functools.lru_cache(maxsize=4)
def _progress_client(redis_url: str):
    """One client (and connection pool) per Redis per worker process, reused by its jobs."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: while Redis is away, a progress update should cost nothing.
    return redis.Redis.from_url(redis_url, socket_timeout=2, retry=Retry(NoBackoff(), 0))


def _progress_reporter(redis_url: str | None, key: str | None):
    """Publish (done, total) to a Redis hash; progress is best effort, never fatal."""
    if not redis_url or not key:
        return None
    import redis

    try:
        client = _progress_client(redis_url)
    except (redis.RedisError, ValueError):
        return None

    def report(done: int, total: int) -> None:
        try:
            pipe = client.pipeline(transaction=False)
            pipe.hset(key, mapping={"done": done, "total": total})
            pipe.expire(key, PROGRESS_TTL_S)
            pipe.execute()
        except redis.RedisError:
            pass

    return report


def _ray_node() -> str | None:
    """The Ray node this job ran on (hostnames repeat when nodes share a machine)."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - a label must never fail a job
        return None
    return None


def _device_label() -> str | None:
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            gpus = ray.get_gpu_ids()
            if gpus:
                import torch

                kind = "cuda" if torch.cuda.is_available() else "cpu"
                return f"{kind} (ray gpu {','.join(str(g) for g in gpus)})"
    except Exception:  # noqa: BLE001 - labelling the device must never fail a job
        return None
    return None


def run_spec(
    spec: dict,
    model: dict,
    *,
    artifacts: str,
    data_root: str,
    progress=None,
    device_label: str | None = None,
    others: dict | None = None,
    checkpoint_name: str | None = None,
    keep_adversarial: bool = True,
) -> JobResult:
    """Run one job in this process: its kind's runner over a freshly built context."""
    kind = job_kind(spec.get("kind", "eval"))
    ctx = JobContext(
        spec=spec,
        model=model,
        artifacts=artifacts,
        data_root=data_root,
        progress=progress,
        device_label=device_label,
        others=dict(others or {}),
        checkpoint_name=checkpoint_name,
    )
    # Every kind loads the submitted network first: a corrupt file or weights that do not
    # fit fail the job before any work is spent on it.
    ctx.net  # noqa: B018
    # Here, not in each kind: every kind's result gets the same provenance record.
    result = provenance.attach(ctx, kind.run(ctx), keep_adversarial=keep_adversarial)
    if spec.get("followup"):
        # Which job a follow-up follows, and why: kept with its result, which replaces
        # whatever details the row held.
        result.details["followup"] = spec["followup"]
    return result


def run_job(payload: dict) -> JobResult | JobFailure:
    progress = _progress_reporter(payload.get("redis_url"), payload.get("progress_key"))
    try:
        with job_deadline(payload.get("deadline"), payload.get("time_limit_s")):
            result = run_spec(
                payload["spec"],
                payload["model"],
                artifacts=payload["artifacts"],
                data_root=payload["data_root"],
                progress=progress,
                device_label=_device_label(),
                others=payload.get("others"),
                checkpoint_name=f"job-{payload['job_id']}" if "job_id" in payload else None,
                keep_adversarial=payload.get("keep_adversarial", True),
            )
    except GauntletError as exc:
        return JobFailure(message=str(exc), permanent=True, worker_host=socket.gethostname())
    node = _ray_node()
    if node:
        result.details = {**(result.details or {}), "ray_node": node}
    return result
