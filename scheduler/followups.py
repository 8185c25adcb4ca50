"""Flags lead to action: the scheduler queues the follow-up attacks a flagged result needs.

When an eval result is stored with a warning sign of gradient masking (Athalye et al.
2018; Carlini et al. 2019), a number from that job alone cannot be trusted, and the
evaluations that would expose the masking are known:

- zero or NaN gradients, or ``autoattack-fast``'s probe (a 100-query random search
  beating 100 gradient steps on most points of a batch, which also catches gradients
  that are not zero but useless): BPDA (the adaptive variant, for a defense run
  non-adaptively), a transfer attack from a surrogate model, and Square with a larger
  query budget;
- randomized output: EOT over more samples (behind a random defense);
- a black-box attack beating every white-box one (the leaderboard's check, on the
  job's entry): Square with a larger budget and a transfer attack.

Follow-ups are ordinary eval jobs, keyed like any other (so each is queued once, and
one that a suite already ran is not run again), with ``suite`` set to ``FOLLOWUP`` and
the reason kept in their spec and details. Follow-ups of follow-ups are never planned,
so flags cannot loop. While one is queued or running, its leaderboard entry reads
"under evaluation" (``pending``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace

import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job, JobStatus
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.gate import FOLLOWUP, held_models, insert_with
from gauntlet.scheduler.queue import JobQueue
from gauntlet.scheduler.spec import JobSpec
from gauntlet.scheduler.submit import enqueue_new, new_jobs

log = logging.getLogger(__name__)

UNDER_EVALUATION = "under evaluation"
QUERY_FACTOR = 4  # Square's budget: this many times the largest one run so far
EOT_FACTOR = 4  # EOT samples: this many times the flagged job's
DEFAULT_QUERIES = 5000  # Square's own default budget
MAX_EOT = 1000  # JobSpec's bound
# The signs of masked gradients a result's flags can carry: (reason, flag text, why).
MASKING_SIGNS = (
    ("masked", ("gradients are zero", "gradients contain NaN"), "gradients are zero or NaN"),
    ("probe", ("a black-box probe beat",), "a black-box probe beat the gradient members"),
)


def after_result(engine, queue: JobQueue, job_id: int, followups: bool) -> str | None:
    """The dispatcher's hook once a result is stored: a gate's release, else follow-ups.

    Returns the message of a gate that stopped its model (the gate job is failed then).
    """
    job = lifecycle.get_job(engine, job_id)
    if job is None or job["status"] != JobStatus.done:
        return None
    if job["kind"] == "gate":
        from gauntlet.scheduler.gate import release

        if release(engine, queue, job_id) is False:
            return lifecycle.get_job(engine, job_id)["error"]
        return None
    if job["kind"] != "eval":
        return None
    if job["spec"].get("followup"):
        _keep_reason(engine, job)  # the result replaced the details; the reason stays
        return None  # no follow-ups of follow-ups: flags cannot loop
    if followups:
        schedule(engine, queue, job)
    return None


def triggers(engine, job: dict) -> list[str]:
    """Which flags of this result call for follow-ups: masked, randomized, black-box."""
    if job["norm"] is None:
        return []  # clean accuracy and the like: nothing an attack budget could follow
    from gauntlet.workers.attacks import ATTACKS

    flags = " ".join((job.get("details") or {}).get("flags") or [])
    found = []
    spec = job["spec"]
    # A model's flags mislead only attacks that take its gradients: a black-box attack
    # never does, and a transfer job's flags are the surrogate's.
    cls = ATTACKS[job["attack"]] if job["attack"] in ATTACKS else None
    white = cls is not None and not cls.black_box
    if white and not (spec.get("source_model") or spec.get("source_ensemble")):
        found += [reason for reason, texts, _ in MASKING_SIGNS if any(t in flags for t in texts)]
        if "randomized output" in flags:
            found.append("randomized")
    if _black_box_wins(engine, job):
        found.append("black-box")
    return found


def _black_box_wins(engine, job: dict) -> bool:
    """The leaderboard's black-box check on this job's entry (model, defense, threat)."""
    from gauntlet.scheduler.boards import leaderboard as board
    from gauntlet.workers.results import unpack

    runs = [
        r
        for r in board._done_runs(engine, job["dataset"])
        if r.model_id == job["model_id"]
        and r.defense == job["defense"]
        and r.subset_key == job["subset_key"]
        and (r.attack == board.CLEAN or (r.norm, r.eps) == (job["norm"], job["eps"]))
    ]
    clean_runs = [r for r in runs if r.attack == board.CLEAN]
    attacked = [r for r in runs if r.attack != board.CLEAN and r.norm is not None]
    if not attacked:
        return False
    n = attacked[0].n
    clean = unpack((clean_runs[-1] if clean_runs else attacked[-1]).clean, n)
    robust: dict[str, object] = defaultdict(lambda: None)
    for run in attacked:
        bits = unpack(run.robust, n)
        robust[run.label] = bits if robust[run.label] is None else robust[run.label] & bits
    return bool(board._masking_flags(clean, dict(robust)))


def plan(engine, job: dict, reasons: list[str]) -> list[tuple[JobSpec, str]]:
    """The follow-up specs for ``reasons``, each with why it was queued."""
    base = JobSpec.from_dict({k: v for k, v in job["spec"].items() if k != "followup"})
    base = replace(base, eps_sweep=[])  # one budget: the flagged one
    planned: list[tuple[JobSpec, str]] = []
    surrogate = _surrogate(engine, job)
    signs = [why for reason, _, why in MASKING_SIGNS if reason in reasons]
    if signs:
        why = ", and ".join(signs)  # one set of follow-ups, whatever showed the masking
        if base.defense is not None and not base.adaptive:
            planned.append((replace(base, adaptive=True), f"{why}: BPDA through the defense"))
        planned += _transfer(base, surrogate, why)
        planned.append((_square(engine, job, base), f"{why}: Square, a larger query budget"))
    if "randomized" in reasons and base.defense is not None:
        eot = min(MAX_EOT, base.eot_samples * EOT_FACTOR)
        planned.append(
            (
                replace(base, adaptive=True, eot_samples=eot),
                f"randomized output: EOT over {eot} samples",
            )
        )
    if "black-box" in reasons:
        why = "a black-box attack beats every white-box one"
        planned.append((_square(engine, job, base), f"{why}: Square, a larger query budget"))
        planned += _transfer(base, surrogate, why)
    kept, seen = [], {job["job_key"]}
    for spec, why in planned:
        try:
            spec.validate()
        except GauntletError as exc:  # e.g. Square on a norm it does not support
            log.info("job %s: follow-up %s skipped: %s", job["id"], spec.attack, exc)
            continue
        if spec.key not in seen:
            seen.add(spec.key)
            kept.append((spec, why))
    return kept


def _transfer(base: JobSpec, surrogate: str | None, why: str) -> list[tuple[JobSpec, str]]:
    if surrogate is None:
        return []  # no other model of the dataset to craft on
    from gauntlet.workers.attacks import ATTACKS

    white = base.attack in ATTACKS and not ATTACKS[base.attack].black_box
    attack, params = (base.attack, base.params) if white else ("pgd", {})
    spec = replace(base, attack=attack, params=dict(params), source_model=surrogate)
    return [(spec, f"{why}: transfer from surrogate {surrogate[:12]}")]


def _square(engine, job: dict, base: JobSpec) -> JobSpec:
    """Square at ``QUERY_FACTOR`` times the largest budget its entry's suites ran.

    Follow-ups' own budgets are left out, or each later flag would raise it again.
    """
    stmt = sa.select(Job.spec).where(
        sa.or_(Job.suite.is_(None), Job.suite != FOLLOWUP),
        Job.model_id == job["model_id"],
        Job.attack == "square",
        Job.subset_key == job["subset_key"],
        Job.norm == job["norm"],
        Job.eps == job["eps"],
    )
    with engine.connect() as conn:
        budgets = [
            int((s.get("params") or {}).get("queries", DEFAULT_QUERIES)) for s in conn.scalars(stmt)
        ]
    queries = QUERY_FACTOR * max(budgets or [DEFAULT_QUERIES])
    return replace(base, attack="square", params={"queries": queries}, source_model=None)


def _surrogate(engine, job: dict) -> str | None:
    """The oldest other model of the dataset that its gate (if any) let through."""
    blocked = held_models(engine)
    for model in lifecycle.list_models(engine):
        if model["dataset"] == job["dataset"] and model["id"] != job["model_id"]:
            if model["id"] not in blocked:
                return model["id"]
    return None


def schedule(engine, queue: JobQueue, job: dict) -> list[int]:
    """Insert and enqueue the follow-ups of one stored result; the ids inserted."""
    reasons = triggers(engine, job)
    if not reasons:
        return []
    inserted = []
    for spec, why in plan(engine, job, reasons):
        reason = {"of": job["id"], "why": why}
        (row,) = new_jobs([spec], FOLLOWUP)
        row = replace(row, spec={**row.spec, "followup": reason})
        inserted += insert_with(engine, [row], details={"followup": reason})
    if inserted:
        log.info("job %s: queued follow-ups %s (%s)", job["id"], inserted, ", ".join(reasons))
        enqueue_new(engine, queue)
    return inserted


def _keep_reason(engine, job: dict) -> None:
    details = dict(job.get("details") or {})
    if details.get("followup") == job["spec"]["followup"]:
        return
    details["followup"] = job["spec"]["followup"]
    with engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == job["id"]).values(details=details))


def pending(engine) -> set[tuple]:
    """(model id, defense, dataset, norm, eps, subset key) of follow-ups not yet finished."""
    stmt = sa.select(
        Job.model_id, Job.defense, Job.dataset, Job.norm, Job.eps, Job.subset_key
    ).where(Job.suite == FOLLOWUP, Job.status.in_([JobStatus.queued, JobStatus.running]))
    with engine.connect() as conn:
        return {tuple(row) for row in conn.execute(stmt)}
