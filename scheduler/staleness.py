"""Stale results: done jobs that ran older code than today's.

A job records the versions it ran with in its stored spec (``JobSpec.to_dict``); its
result is stale when they differ from what the registries declare now. A stale result
stays on the boards, marked as such, until a fresh run of the same evaluation (the
same ``JobSpec.evaluation_key``) replaces it. ``gauntlet nightly`` makes that run: a
changed version is a changed job key, so the suite's evaluation has no job yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Job, JobStatus
from gauntlet.scheduler.spec import JobSpec, canonical_json
from gauntlet.scheduler.versions import changes

_CHUNK = 500  # ids per IN (...): far below every database's parameter limit


@dataclass(frozen=True)
class Stale:
    """A stale job: which evaluation it is and what changed since it ran."""

    evaluation_key: str
    changes: tuple[str, ...]


class _Today:
    """Today's versions per configuration, computed once per pass.

    Building the attack of every row would dominate a board's query; a cache that
    outlived one pass would miss a version changed since (a test bumps one at runtime).
    """

    def __init__(self) -> None:
        self._versions: dict[str, dict | None] = {}

    def changes(self, stored: dict) -> tuple[str, ...]:
        parts = {k: stored.get(k) for k in ("kind", "attack", "params", "defense")}
        config = canonical_json(parts)
        if config not in self._versions:
            try:
                self._versions[config] = JobSpec.from_dict(stored).versions()
            except (GauntletError, TypeError):
                # An attack, defense or kind no longer registered (or a field no longer
                # known): there is nothing to compare with, and nothing nightly could
                # re-run either, so the result is left as it is.
                self._versions[config] = None
        current = self._versions[config]
        return () if current is None else tuple(changes(stored.get("versions"), current))


def _evaluation_key(stored: dict) -> str | None:
    try:
        return JobSpec.from_dict(stored).evaluation_key
    except (GauntletError, TypeError):
        return None


def _done_specs(engine: sa.Engine, where: sa.ColumnElement[bool]) -> dict[int, dict]:
    stmt = sa.select(Job.id, Job.spec).where(where, Job.status == JobStatus.done)
    with engine.connect() as conn:
        return {job_id: spec for job_id, spec in conn.execute(stmt)}


def _specs_of(engine: sa.Engine, job_ids: Iterable[int]) -> dict[int, dict]:
    ids = list(dict.fromkeys(job_ids))
    specs: dict[int, dict] = {}
    for start in range(0, len(ids), _CHUNK):
        specs.update(_done_specs(engine, Job.id.in_(ids[start : start + _CHUNK])))
    return specs


def _stale(specs: dict[int, dict], today: _Today) -> dict[int, Stale]:
    found = {}
    for job_id, stored in specs.items():
        what = today.changes(stored)
        key = _evaluation_key(stored) if what else None
        if key is not None:
            found[job_id] = Stale(key, what)
    return found


def stale_evaluations(engine: sa.Engine, model_id: str) -> set[str]:
    """The evaluation keys of ``model_id``'s stale done jobs (what nightly re-runs)."""
    return {
        s.evaluation_key
        for s in _stale(_done_specs(engine, Job.model_id == model_id), _Today()).values()
    }


def current_runs(engine: sa.Engine, runs: Sequence[Any]) -> tuple[list[Any], dict[int, Stale]]:
    """``runs`` (done jobs, anything with a ``job_id``) less the stale ones that a fresh
    run of the same evaluation replaces, and the stale runs kept, by job id."""
    specs = _specs_of(engine, (run.job_id for run in runs))
    stale = _stale(specs, _Today())
    if not stale:
        return list(runs), {}
    # Only fresh runs of a model and attack that has a stale run can replace one.
    wanted = {(specs[i].get("model_id"), specs[i].get("attack")) for i in stale}
    fresh = {
        _evaluation_key(spec)
        for job_id, spec in specs.items()
        if job_id not in stale and (spec.get("model_id"), spec.get("attack")) in wanted
    }
    kept = [
        run
        for run in runs
        if run.job_id not in stale or stale[run.job_id].evaluation_key not in fresh
    ]
    return kept, {run.job_id: stale[run.job_id] for run in kept if run.job_id in stale}


def reasons(stale: dict[int, Stale], runs: Iterable[Any]) -> list[str]:
    """What changed since ``runs`` ran, over those of them that are stale, sorted."""
    return sorted(
        {
            what
            for run in runs
            if run is not None
            for what in stale.get(run.job_id, Stale("", ())).changes
        }
    )
