"""The function a Ray task (or the local executor) runs for one job.

It classifies failures at the source: ``GauntletError`` (the submitter's problem) comes
back as a permanent ``JobFailure``; anything else propagates, and the scheduler treats
it as transient (a lost node, an out-of-memory kill) and retries.
"""

from __future__ import annotations

import socket

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.evaluate import evaluate
from gauntlet.workers.result import JobFailure, JobResult

PROGRESS_TTL_S = 3600


def _progress_reporter(redis_url: str | None, key: str | None):
    """Publish (done, total) to a Redis hash; progress is best effort, never fatal."""
    if not redis_url or not key:
        return None
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=2)
    except (redis.RedisError, ValueError):
        return None

    def report(done: int, total: int) -> None:
        try:
            client.hset(key, mapping={"done": done, "total": total})
            client.expire(key, PROGRESS_TTL_S)
        except redis.RedisError:
            pass

    return report


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


def run_job(payload: dict) -> JobResult | JobFailure:
    progress = _progress_reporter(payload.get("redis_url"), payload.get("progress_key"))
    try:
        return evaluate(
            payload["spec"],
            payload["model"],
            artifacts=payload["artifacts"],
            data_root=payload["data_root"],
            progress=progress,
            device_label=_device_label(),
            source_model=payload.get("source_model"),
            source_models=payload.get("source_models"),
            checkpoint_name=f"job-{payload['job_id']}" if "job_id" in payload else None,
        )
    except GauntletError as exc:
        return JobFailure(message=str(exc), permanent=True, worker_host=socket.gethostname())
