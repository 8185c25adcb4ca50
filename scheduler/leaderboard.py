"""The robustness leaderboard, computed from SQL alone.

One table per threat model: (dataset, norm, eps, subset_key). A model's robust accuracy
in a table is the per-example worst case over every attack run against it there: an
example counts as robust only if it survived all of them (an AND of the stored
bitsets). That is never higher, and usually lower, than the weakest single attack's
accuracy, because different attacks break different examples.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from db.schema import Job, JobStatus, Model, Outcome
from workers.outcomes import unpack, wilson_interval, worst_case

log = logging.getLogger(__name__)

CLEAN = "clean"  # the attack name of the unperturbed evaluation


@dataclass
class Entry:
    rank: int
    model_id: str
    model: str
    arch: str
    dataset: str
    norm: str
    eps: float
    subset_key: str
    clean_accuracy: float
    robust_accuracy: float
    n: int
    robust_low: float
    robust_high: float
    attacks: list[str]  # attack names evaluated in this group
    strongest_attack: str | None  # the attack that alone broke the most points


@dataclass(frozen=True)
class _Run:
    """One done job with its outcomes."""

    job_id: int
    model_id: str
    model: str
    arch: str
    dataset: str
    attack: str
    norm: str | None
    eps: float | None
    subset_key: str
    n: int
    clean: bytes
    robust: bytes


def _done_runs(engine: sa.Engine, dataset: str | None) -> list[_Run]:
    stmt = (
        sa.select(
            Job.id,
            Job.model_id,
            Model.name,
            Model.arch,
            Job.dataset,
            Job.attack,
            Job.norm,
            Job.eps,
            Job.subset_key,
            Outcome.n,
            Outcome.clean,
            Outcome.robust,
        )
        .join(Model, Model.id == Job.model_id)
        .join(Outcome, Outcome.job_id == Job.id)
        .where(Job.status == JobStatus.done)
        .order_by(Job.id)
    )
    if dataset is not None:
        stmt = stmt.where(Job.dataset == dataset)
    with engine.connect() as conn:
        return [_Run(*row) for row in conn.execute(stmt)]


def _strongest(clean: np.ndarray, robust_by_attack: dict[str, np.ndarray]) -> str | None:
    """The attack that alone broke the most clean-correct points; None if none broke any."""
    best, best_broken = None, 0
    for attack in sorted(robust_by_attack):
        broken = int(np.count_nonzero(clean & ~robust_by_attack[attack]))
        if broken > best_broken:
            best, best_broken = attack, broken
    return best


def _entry(
    group: tuple[str, str, float, str], model_runs: list[_Run], clean_run: _Run | None
) -> Entry:
    dataset, norm, eps, subset_key = group
    n = model_runs[0].n
    consistent = [run for run in model_runs if run.n == n]
    if len(consistent) != len(model_runs) or (clean_run is not None and clean_run.n != n):
        # Same subset key but a different size: a worker bug. Show what agrees, and say so.
        log.warning("outcome sizes disagree for model %s in %s", model_runs[0].model_id, group)
        if clean_run is not None and clean_run.n != n:
            clean_run = None
    clean = unpack((clean_run or consistent[-1]).clean, n)
    robust_by_attack: dict[str, np.ndarray] = {}
    for run in consistent:
        # Two runs of one attack (e.g. two configurations) count as one, at their worst.
        robust = unpack(run.robust, n)
        robust_by_attack[run.attack] = robust & robust_by_attack.get(run.attack, robust)
    # AND with clean as well: a point misclassified without any attack is not robust,
    # even if a worker's robust bit claimed otherwise.
    survived = worst_case([run.robust for run in consistent], n) & clean
    k = int(np.count_nonzero(survived))
    low, high = wilson_interval(k, n)
    first = model_runs[0]
    return Entry(
        rank=0,
        model_id=first.model_id,
        model=first.model,
        arch=first.arch,
        dataset=dataset,
        norm=norm,
        eps=eps,
        subset_key=subset_key,
        clean_accuracy=float(np.count_nonzero(clean)) / n if n else 0.0,
        robust_accuracy=k / n if n else 0.0,
        n=n,
        robust_low=low,
        robust_high=high,
        attacks=sorted(robust_by_attack),
        strongest_attack=_strongest(clean, robust_by_attack),
    )


def leaderboard(engine: sa.Engine, *, dataset: str | None = None) -> list[Entry]:
    """Every table's entries, sorted by (dataset, norm, eps, subset_key, rank).

    Only norm-bounded attacks (norm and eps set) make a table; a model's "clean" job
    belongs to every table of its dataset and subset. Failed, queued and running jobs
    are ignored: only done jobs have outcomes.
    """
    runs = _done_runs(engine, dataset)
    attacks: dict[tuple, dict[str, list[_Run]]] = defaultdict(lambda: defaultdict(list))
    clean_runs: dict[tuple[str, str, str], _Run] = {}
    for run in runs:
        if run.attack == CLEAN:
            # Ordered by id: the latest clean run of a model and subset wins.
            clean_runs[(run.model_id, run.dataset, run.subset_key)] = run
        elif run.norm is not None and run.eps is not None:
            group = (run.dataset, run.norm, run.eps, run.subset_key)
            attacks[group][run.model_id].append(run)

    entries: list[Entry] = []
    for group, by_model in attacks.items():
        table = []
        for model_id, model_runs in by_model.items():
            clean_run = clean_runs.get((model_id, group[0], group[3]))
            table.append(_entry(group, model_runs, clean_run))
        table.sort(key=lambda e: (-e.robust_accuracy, -e.clean_accuracy, e.model, e.model_id))
        for rank, entry in enumerate(table, start=1):
            entry.rank = rank
        entries.extend(table)
    entries.sort(key=lambda e: (e.dataset, e.norm, e.eps, e.subset_key, e.rank))
    return entries
