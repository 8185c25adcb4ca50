"""Job kinds as plug-ins: one registry, one module per kind.

A kind declares its name, its runner (``run(ctx) -> JobResult``), the board that reads
its results, for kinds whose ``attack`` field names a procedure the settings check (the
same check runs at submit time in the scheduler and again in the worker), and which
other models a job of it loads, and its default time limit. The scheduler and the task
entry look kinds up here and never list them, so a new kind is its module, its tests
and a README line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.registry import Registry


def check_procedure(
    method: str, methods, params: dict, accepted, *, what: str, params_what: str
) -> None:
    """A kind's procedure is known and each of its params accepted; else one clear error.

    ``what`` names the procedure ("training method"), ``params_what`` its parameters
    ("training parameter(s)"); both messages list what would have been accepted.
    """
    if method not in methods:
        raise GauntletError(f"Unknown {what} {method!r}; known: {', '.join(methods)}")
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise GauntletError(
            f"Unknown {params_what} {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}"
        )


def _no_models(spec: dict) -> list[str]:
    return []


HOUR = 3600.0
# What a kind gets unless it says otherwise: an attack on a few thousand points.
DEFAULT_TIME_LIMIT_S = 2 * HOUR


@dataclass(frozen=True)
class JobKind:
    name: str
    # run(ctx: JobContext) -> JobResult; GauntletError for what the submitter can fix.
    run: Callable
    # The board (leaderboard, calibration, corruption, transfer, backdoor, privacy, derived
    # models) that shows this kind's results.
    board: str
    # check(procedure, params) -> settings with defaults, for kinds whose ``attack``
    # names a procedure (a training method, a backdoor defense, an aggregator); None when
    # ``attack`` is an attack from the attack registry.
    check: Callable[[str, dict], dict] | None = None
    # Ids of other models a job loads (transfer sources, static models); the dispatcher
    # sends their rows along with the job.
    models: Callable[[dict], list[str]] = _no_models
    # Seconds a job of this kind may run before it is cancelled and failed; an
    # evaluation's ``timeout_s`` overrides it, the global cap bounds both.
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    # The runner's version: bump it when a change alters its results. It also stands
    # for the kind's own procedures (training methods, backdoor defenses, aggregators).
    version: int = 1


JOB_KINDS: Registry[JobKind] = Registry("job kind")

# The built-in kinds, imported on first lookup: each module registers itself.
_NAMES = ("eval", "calibration", "corruption", "train", "backdoor", "pate", "explain", "gate")
BUILT_IN = tuple(f"gauntlet.workers.jobs.{name}" for name in _NAMES)


def register_kind(kind: JobKind) -> JobKind:
    return JOB_KINDS.register(kind)


def _load_built_ins() -> None:
    for module in BUILT_IN:
        importlib.import_module(module)


def job_kind(name: str) -> JobKind:
    """The kind called ``name``; GauntletError naming the known ones otherwise."""
    _load_built_ins()
    return JOB_KINDS.get(name)


def kind_names() -> list[str]:
    _load_built_ins()
    return JOB_KINDS.names()
