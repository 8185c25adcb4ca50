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
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa

from gauntlet.db.schema import Job, Model, Outcome
from gauntlet.scheduler import staleness
from gauntlet.scheduler.boards import rejecting
from gauntlet.scheduler.boards.metrics import done_rows
from gauntlet.workers.results import unpack, wilson_interval

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
    defense: str | None = None  # the defense's configuration; None for the bare model
    # Worst case over non-adaptive attacks only (defended entries): far above
    # robust_accuracy means the defense mostly masks gradients.
    robust_non_adaptive: float | None = None
    unreliable: list[str] = field(default_factory=list)  # "potentially unreliable": why
    # A defense that may refuse to answer (DkNN); see rejecting.py for what counts.
    rejecting: bool = False
    rejected_clean: float | None = None  # share of clean inputs it refused
    # Results computed by older code (a version bumped since): what changed. Empty once
    # fresh runs replace them (``scheduler.staleness``).
    stale: list[str] = field(default_factory=list)
    # Follow-ups its flags queued are still running (``scheduler.followups``).
    under_evaluation: bool = False
    # The AutoAttack protocol among its attacks ("autoattack" or "autoattack-fast";
    # the full one where both ran); None when neither did.
    protocol: str | None = None


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
    defense: str | None
    source_model_id: str | None
    details: dict | None

    @property
    def label(self) -> str:
        if not self.source_model_id:
            return self.attack
        return "transfer-ensemble" if self.source_model_id.startswith("ensemble:") else "transfer"

    @property
    def adaptive(self) -> bool:
        return bool((self.details or {}).get("adaptations"))

    @property
    def flags(self) -> list[str]:
        return list((self.details or {}).get("flags") or [])


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
            Job.defense,
            Job.source_model_id,
            Job.details,
        )
        .join(Model, Model.id == Job.model_id)
        .join(Outcome, Outcome.job_id == Job.id)
        .where(Job.kind == "eval")
    )
    return [_Run(*row) for row in done_rows(engine, stmt, dataset=dataset)]


def _strongest(clean: np.ndarray, robust_by_attack: dict[str, np.ndarray]) -> str | None:
    """The attack that alone broke the most clean-correct points; None if none broke any."""
    best, best_broken = None, 0
    for attack in sorted(robust_by_attack):
        broken = int(np.count_nonzero(clean & ~robust_by_attack[attack]))
        if broken > best_broken:
            best, best_broken = attack, broken
    return best


def _is_black_box(attack: str) -> bool:
    from gauntlet.workers.attacks import ATTACKS

    cls = ATTACKS[attack] if attack in ATTACKS else None
    return attack.startswith("transfer") or bool(cls and cls.black_box)


def _masking_flags(clean: np.ndarray, robust_by_attack: dict[str, np.ndarray]) -> list[str]:
    """A black-box attack beating every white-box one is the classic sign of masking."""
    accuracy = {a: int(np.count_nonzero(r & clean)) for a, r in robust_by_attack.items()}
    black = [a for a in accuracy if _is_black_box(a)]
    white = [a for a in accuracy if not _is_black_box(a)]
    if black and white:
        best_black = min(black, key=accuracy.get)
        if accuracy[best_black] < min(accuracy[a] for a in white):
            return [f"black-box {best_black} beats every white-box attack (gradient masking)"]
    return []


# The AutoAttack protocols an entry's number may come from, the stronger first.
PROTOCOLS = ("autoattack", "autoattack-fast")


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
    rejects = rejecting.is_rejecting(model_runs[0])
    credit = any(rejecting.is_adaptive(run) for run in consistent)
    bits = {run.job_id: rejecting.robust_bits(run, n, credit=credit) for run in consistent}
    robust_by_attack: dict[str, np.ndarray] = {}
    for run in consistent:
        # Two runs of one attack (e.g. two configurations) count as one, at their worst.
        robust = bits[run.job_id]
        robust_by_attack[run.label] = robust & robust_by_attack.get(run.label, robust)
    # AND with clean as well: a point misclassified without any attack is not robust,
    # even if a worker's robust bit claimed otherwise.
    survived = np.logical_and.reduce([bits[run.job_id] for run in consistent]) & clean
    k = int(np.count_nonzero(survived))
    low, high = wilson_interval(k, n)
    first = model_runs[0]
    non_adaptive = None
    if first.defense is not None:
        plain = [run for run in consistent if not run.adaptive]
        if plain:
            kept = [rejecting.robust_bits(run, n, credit=False) for run in plain]
            non_adaptive = float(np.count_nonzero(np.logical_and.reduce(kept) & clean)) / n
    # A defended entry's non-adaptive runs are expected to look masked (that is why the
    # adaptive ones exist); the entry is unreliable if its adaptive evaluation is.
    trusted = [run for run in consistent if run.adaptive or run.defense is None] or consistent
    flags = sorted({flag for run in trusted for flag in run.flags})
    flags += _masking_flags(clean, robust_by_attack)
    flags += [rejecting.NO_ADAPTIVE] if rejects and not credit else []
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
        defense=first.defense,
        robust_non_adaptive=non_adaptive,
        unreliable=flags,
        rejecting=rejects,
        rejected_clean=rejecting.rejected_clean(consistent, clean_run, n) if rejects else None,
        protocol=next((p for p in PROTOCOLS if p in robust_by_attack), None),
    )


def leaderboard(engine: sa.Engine, *, dataset: str | None = None) -> list[Entry]:
    """Every table's entries, sorted by (dataset, norm, eps, subset_key, rank).

    Only norm-bounded attacks (norm and eps set) make a table; a model's "clean" job
    belongs to every table of its dataset and subset. Failed, queued and running jobs
    are ignored: only done jobs have outcomes.
    """
    runs, stale = staleness.current_runs(engine, _done_runs(engine, dataset))
    attacks: dict[tuple, dict[tuple, list[_Run]]] = defaultdict(lambda: defaultdict(list))
    clean_runs: dict[tuple, _Run] = {}
    for run in runs:
        # An entry is a model behind a defense (or none): each is ranked on its own.
        entry_key = (run.model_id, run.defense)
        if run.attack == CLEAN:
            # Ordered by id: the latest clean run of a model and subset wins.
            clean_runs[(entry_key, run.dataset, run.subset_key)] = run
        elif run.norm is not None and run.eps is not None:
            group = (run.dataset, run.norm, run.eps, run.subset_key)
            attacks[group][entry_key].append(run)

    entries: list[Entry] = []
    for group, by_entry in attacks.items():
        table = []
        for entry_key, model_runs in by_entry.items():
            clean_run = clean_runs.get((entry_key, group[0], group[3]))
            entry = _entry(group, model_runs, clean_run)
            entry.stale = staleness.reasons(stale, [*model_runs, clean_run])
            table.append(entry)
        table.sort(
            key=lambda e: (
                -e.robust_accuracy,
                -e.clean_accuracy,
                e.model,
                e.defense or "",
                e.model_id,
            )
        )
        for rank, entry in enumerate(table, start=1):
            entry.rank = rank
        entries.extend(table)
    entries.sort(key=lambda e: (e.dataset, e.norm, e.eps, e.subset_key, e.rank))
    from gauntlet.scheduler.followups import pending  # it builds on this module

    waiting = pending(engine)
    for e in entries:
        key = (e.model_id, e.defense, e.dataset, e.norm, e.eps, e.subset_key)
        e.under_evaluation = key in waiting
    return entries
