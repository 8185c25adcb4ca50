"""``gauntlet nightly``: re-expand every model x suite and enqueue what has no result.

Job keys include each attack's resolved configuration, so a changed attack default or a
new evaluation in a suite yields new keys, while unchanged evaluations keep theirs and
are skipped. They include the versions of the code a job runs too, so a bumped attack,
defense or job kind version yields new keys for exactly the evaluations that run it:
their stale results are re-run, and the report counts them (``stale``). A Redis lease
with a fencing token makes two overlapping nightly runs harmless: the second one stops
at once, and a run whose lease lapsed stops before it writes.

With ``fast`` (``gauntlet nightly --fast``) every model gets the ``autoattack`` suite;
a model whose ``autoattack`` results are current (none missing: not new, no version
bumped since) gets the cheaper ``autoattack-fast`` suite as well, while a new model, or
one whose results went stale, gets the full ``autoattack`` re-run as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import lifecycle, staleness
from gauntlet.scheduler.gate import FOLLOWUP, admitted
from gauntlet.scheduler.lease import Lease, check_fence
from gauntlet.scheduler.queue import JobQueue
from gauntlet.scheduler.submit import enqueue_new, expand_suite, new_jobs

LEASE_NAME = "nightly"
# ``fast``: the full protocol's suite, and the one current models get instead.
FULL_SUITE, FAST_SUITE = "autoattack", "autoattack-fast"


@dataclass
class NightlyReport:
    """What one run found: models, evaluations expanded, and jobs new per suite."""

    models: int
    expanded: int
    new_jobs: int
    enqueued: int
    suites: dict
    # Suites that no longer load here (a file named by path that is gone), with why:
    # one missing file must not stop the evaluations of every other suite.
    skipped: dict = field(default_factory=dict)
    # New jobs that re-run a stale result (a version bumped since it ran).
    stale: int = 0


def model_suites(engine, model_id: str, extra: list[str]) -> list[tuple[str, int | None]]:
    """(suite, n) pairs a model was evaluated with, plus the operator's suites at their n.

    A submission may override a suite's ``n``; re-expanding at the suite's own size would
    create a second set of jobs instead of finding the first.
    """
    used = set()
    for job in lifecycle.list_jobs(engine, model=model_id, limit=None):
        if job["suite"] and job["suite"] != FOLLOWUP:  # follow-ups belong to no suite
            used.add((job["suite"], int(job["subset_key"].split(":")[2])))
    named = {suite for suite, _ in used}
    used |= {(suite, None) for suite in extra if suite not in named}
    return sorted(used, key=lambda pair: (pair[0], pair[1] or 0))


def nightly(
    engine,
    queue: JobQueue,
    client,
    *,
    prefix: str,
    suites: list[str] | None = None,
    lease_ms: int = 15 * 60 * 1000,
    fast: bool = False,
) -> NightlyReport:
    report = NightlyReport(models=0, expanded=0, new_jobs=0, enqueued=0, suites={})
    extra = [*(suites or []), *([FULL_SUITE] if fast else [])]
    with Lease(client, LEASE_NAME, lease_ms, prefix=prefix) as lease:
        for model in admitted(engine, lifecycle.list_models(engine)):  # past their gate
            report.models += 1
            stale = staleness.stale_evaluations(engine, model["id"])
            todo = model_suites(engine, model["id"], extra)
            while todo:
                suite, n = todo.pop(0)
                try:
                    specs = expand_suite(suite, model["id"], model["dataset"], n, engine=engine)
                except GauntletError as exc:
                    report.skipped[suite] = str(exc)
                    continue
                report.expanded += len(specs)
                have = lifecycle.done_job_keys(engine, [s.key for s in specs])
                missing = [s for s in specs if s.key not in have]
                if fast and suite == FULL_SUITE and all(s.attack != FULL_SUITE for s in missing):
                    todo.append((FAST_SUITE, n))  # current: tonight's check is the cheap one
                if not check_fence(client, LEASE_NAME, lease.token, prefix=prefix):
                    raise GauntletError("the nightly lease expired mid-run; nothing more written")
                inserted = lifecycle.insert_jobs(engine, new_jobs(missing, suite))
                report.new_jobs += len(inserted)
                # Once per key: a suite may list one evaluation twice.
                unique = {s.key: s for s in missing}.values()
                report.stale += sum(s.evaluation_key in stale for s in unique)
                report.suites[suite] = report.suites.get(suite, 0) + len(inserted)
        # The same compare-and-set as submit's: a submit racing this run never makes
        # a job's entry twice.
        report.enqueued = enqueue_new(engine, queue)
    return report
