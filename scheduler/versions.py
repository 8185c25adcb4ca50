"""The versions a job depends on: its kind's, its attacks' and its defense's.

Every attack, defense and job kind declares an integer ``version`` (1 unless bumped).
A job's numbers come from the code of its kind, of every attack it runs (a composite
such as autoattack runs its members too) and of the defense it is evaluated behind, so
its versions are, e.g.::

    {"kind": 1, "attack": {"autoattack": 1, "apgd-ce": 1, ...}, "defense": {"dknn": 1}}

Kinds whose ``attack`` names a procedure of their own (a training method, a backdoor
defense, a PATE aggregator) keep that procedure's code in the kind, so the kind's
version stands for it: bump the kind when one of its procedures changes. Where the
procedure is a registered attack by name (the explain kind's ``fgsm`` and ``pgd``), the
attack's version counts as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gauntlet.scheduler.spec import JobSpec


def spec_versions(spec: JobSpec) -> dict:
    """The versions ``spec`` depends on, read from the registries now."""
    from gauntlet.workers.attacks import ATTACKS, build_attack
    from gauntlet.workers.defenses import DEFENSES
    from gauntlet.workers.jobs import job_kind

    kind = job_kind(spec.kind)
    versions: dict = {"kind": kind.version}
    if kind.check is None:
        versions["attack"] = build_attack(spec.attack, spec.params).versions()
    elif spec.attack in ATTACKS:
        # The procedure's params are the kind's settings, not the attack's: its defaults.
        versions["attack"] = build_attack(spec.attack).versions()
    else:
        versions["attack"] = {}
    if spec.defense is not None:
        versions["defense"] = {spec.defense: DEFENSES.get(spec.defense).version}
    return versions


def flatten(versions: dict) -> dict[str, int]:
    """``{"kind": 2, "attack": {"pgd": 1}}`` -> ``{"job kind": 2, "attack pgd": 1}``."""
    flat = {"job kind": versions.get("kind", 1)}
    for part in ("attack", "defense"):
        for name, version in (versions.get(part) or {}).items():
            flat[f"{part} {name}"] = version
    return flat


def bumped(versions: dict) -> bool:
    """Whether any version is above 1, the version everything started at."""
    return any(version != 1 for version in flatten(versions).values())


def changes(recorded: dict | None, current: dict) -> list[str]:
    """What differs between the versions a job ran with and today's, e.g.
    ``["attack pgd v1 -> v2"]``; [] when it is current.

    ``recorded`` None is a job stored before versions were recorded: it ran version 1 of
    everything. A part missing on one side counts as version 1 there too.
    """
    old = flatten(recorded or {})
    new = flatten(current)
    return [
        f"{name} v{old.get(name, 1)} -> v{new.get(name, 1)}"
        for name in sorted(set(old) | set(new))
        if old.get(name, 1) != new.get(name, 1)
    ]
