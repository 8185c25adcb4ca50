"""What a worker hands back: the typed result, and its per-example outcomes.

``JobResult``, ``JobFailure`` and ``Metric`` are small, picklable dataclasses: they travel
from a Ray task to the scheduler, which writes them to SQL in one transaction. Workers
never talk to SQL themselves.

Per-example outcomes are compact bitsets: one bit per example of the evaluation subset
(numpy's big-endian ``packbits`` order), so 10,000 outcomes take 1,250 bytes and the
per-example worst case across attacks is a bitwise AND. The Wilson score interval gives
every rate its 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def pack(mask) -> bytes:
    """Pack a boolean vector (numpy array, list or torch tensor) into bytes."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask, dtype=bool).ravel()
    return np.packbits(array).tobytes()


def unpack(data: bytes, n: int) -> np.ndarray:
    """The boolean vector of length ``n`` that ``pack`` stored in ``data``."""
    if len(data) != (n + 7) // 8:
        raise ValueError(f"Expected {(n + 7) // 8} bytes for {n} outcomes, but got {len(data)}")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool)


def worst_case(bitsets: Iterable[bytes], n: int) -> np.ndarray:
    """Examples that survived every evaluation: the AND of all the bitsets."""
    survived = np.ones(n, dtype=bool)
    for data in bitsets:
        survived &= unpack(data, n)
    return survived


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and behaves at k = 0 or n,
    which is where robust accuracies often sit.
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"Expected 0 <= k <= n, but got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


@dataclass(frozen=True)
class Metric:
    """One number with its sample size and 95% interval (None where none applies)."""

    name: str
    value: float
    n: int
    low: float | None = None
    high: float | None = None


@dataclass
class JobResult:
    """What an evaluation job produced.

    ``clean`` and ``robust`` are per-example outcomes packed as bitsets (see
    ``pack`` below) over the job's deterministic evaluation subset, so the worst
    case across attacks is a bitwise AND of stored rows.
    """

    metrics: list[Metric]
    n: int
    clean: bytes
    robust: bytes
    worker_host: str = ""
    device: str = ""
    code_version: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    # Pieces of the job that ran as their own tasks (``workers.fanout.SubTaskRecord``).
    subtasks: list = field(default_factory=list)


@dataclass
class JobFailure:
    """A failure the worker classified: ``permanent`` failures are not retried."""

    message: str
    permanent: bool
    worker_host: str = ""
