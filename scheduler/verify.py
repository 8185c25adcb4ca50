"""``gauntlet verify JOB``: rerun a done eval job here and compare it with what was stored.

The rerun uses the job's own spec (the same points, seed and batch size) in this process,
and compares per-example outcomes (the clean and robust bitsets of the outcomes table)
and the hash of the adversarial examples against the job's provenance record.

Tolerance: on CPU the computation is deterministic, so outcomes must be identical. On
GPU, kernels are free to reorder floating-point sums (cuDNN picks algorithms at run
time), so a point near the decision boundary can flip; up to ``GPU_TOLERANCE`` of the
points may differ there, and the hash of the adversarial examples is then expected to
differ too. Either run being on GPU brings the tolerance in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import JobStatus, Outcome
from gauntlet.scheduler import lifecycle
from gauntlet.workers.jobs import job_kind
from gauntlet.workers.results import unpack

# The share of points whose outcome may flip between two GPU runs.
GPU_TOLERANCE = 0.005


@dataclass
class VerifyReport:
    job_id: int
    verdict: str  # identical | within tolerance | different
    n: int
    clean_flips: int
    robust_flips: int
    # Points whose clean or robust outcome differs, and how many of them may (GPU only).
    points_differing: int
    allowed: int
    stored_sha256: str | None
    rerun_sha256: str | None
    hash_matches: bool | None  # None: the job predates provenance, no hash was stored
    device: str
    stored_device: str | None

    @property
    def ok(self) -> bool:
        return self.verdict != "different"


def _status(job: dict) -> str:
    return str(getattr(job["status"], "value", job["status"]))


def _stored_outcomes(engine, job_id: int) -> tuple[int, bytes, bytes] | None:
    stmt = sa.select(Outcome.n, Outcome.clean, Outcome.robust).where(Outcome.job_id == job_id)
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    return None if row is None else (int(row[0]), bytes(row[1]), bytes(row[2]))


def _checked_job(app, job_id: int) -> dict:
    job = lifecycle.get_job(app.engine, job_id)
    if job is None:
        raise GauntletError(f"there is no job {job_id}: `gauntlet jobs` lists them")
    if job["kind"] != "eval":
        raise GauntletError(f"job {job_id} is a {job['kind']} job: only eval jobs can be verified")
    if _status(job) != JobStatus.done.value:
        raise GauntletError(f"job {job_id} is {_status(job)}: only a done job can be verified")
    return job


def verify(app, job_id: int) -> VerifyReport:
    """Rerun done eval job ``job_id`` in this process and compare it with its stored result."""
    from gauntlet.workers.task import run_spec

    job = _checked_job(app, job_id)
    stored = _stored_outcomes(app.engine, job_id)
    if stored is None:
        raise GauntletError(f"job {job_id} has no stored outcomes to compare with")
    spec = job["spec"]
    model = lifecycle.get_model(app.engine, job["model_id"])
    others = {i: lifecycle.get_model(app.engine, i) for i in job_kind("eval").models(spec)}
    # No checkpoint: a leftover one would hand the rerun the first run's examples.
    # Not kept: the rerun only needs the hash, and must not add a file to the store.
    result = run_spec(
        spec,
        model,
        artifacts=str(app.settings.artifacts),
        data_root=str(app.settings.data_root),
        others=others,
        keep_adversarial=False,
    )
    provenance = (job.get("details") or {}).get("provenance") or {}
    rerun = result.details["provenance"]
    n, clean, robust = stored
    if n == result.n:
        clean_diff = unpack(clean, n) != unpack(result.clean, n)
        robust_diff = unpack(robust, n) != unpack(result.robust, n)
    else:  # a different number of points: nothing lines up, every point differs
        n = max(n, result.n)
        clean_diff = robust_diff = np.ones(n, dtype=bool)
    differing = int((clean_diff | robust_diff).sum())
    on_gpu = "cuda" in (rerun.get("device") or "") or "cuda" in (provenance.get("device") or "")
    allowed = math.floor(GPU_TOLERANCE * n) if on_gpu else 0
    stored_sha = provenance.get("adversarial_sha256")
    rerun_sha = rerun.get("adversarial_sha256")
    hash_matches = None if stored_sha is None else stored_sha == rerun_sha
    if differing == 0 and hash_matches is not False:
        verdict = "identical"
    elif on_gpu and differing <= allowed:
        verdict = "within tolerance"
    else:
        verdict = "different"
    return VerifyReport(
        job_id=job_id,
        verdict=verdict,
        n=n,
        clean_flips=int(clean_diff.sum()),
        robust_flips=int(robust_diff.sum()),
        points_differing=differing,
        allowed=allowed,
        stored_sha256=stored_sha,
        rerun_sha256=rerun_sha,
        hash_matches=hash_matches,
        device=rerun.get("device", ""),
        stored_device=provenance.get("device"),
    )
