"""The Ray connection: a cluster by address, or a local Ray started on demand."""

from __future__ import annotations

import os

from gauntlet.cluster.settings import Settings


def init_ray(settings: Settings, *, num_cpus: int | None = None, num_gpus: float | None = None):
    """Connect once per process; later calls reuse the connection."""
    import ray

    if ray.is_initialized():
        return ray
    # Ray's own log lines about worker start-up would drown the CLI's output.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if settings.ray_address:
        ray.init(address=settings.ray_address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
        )
    return ray


def largest_node_gpus() -> float:
    """GPUs on the best-equipped live node: a task asking for more can never run."""
    import ray

    best = 0.0
    for node in ray.nodes():
        if node.get("Alive"):
            best = max(best, float(node.get("Resources", {}).get("GPU", 0.0)))
    return best
