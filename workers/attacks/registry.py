"""The attack registry: names to classes, and building attacks from user parameters.

Built-in attacks register through ``register_attack`` exactly as a third party would, so
there is one path from a suite's ``{"name": ..., "params": ...}`` to an attack object,
and one place that turns bad names or parameters into clear messages at submit time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import Attack, Threat, check_threat
from gauntlet.workers.registry import Registry, configure, keyword_params


class AttackRegistry(Registry[type[Attack]]):
    """The attack ``Registry``, plus removal: tests register throw-away attacks."""

    def __delitem__(self, name: str) -> None:
        del self._entries[name]


ATTACKS = AttackRegistry("attack")

A = TypeVar("A", bound=type[Attack])


def register_attack(cls: A) -> A:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise TypeError(f"Expected an Attack subclass, but got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`")
    # Checked here, not left to the registry, to keep raising ValueError as before.
    if name in ATTACKS and ATTACKS[name] is not cls:
        raise ValueError(f"An attack named {name!r} is already registered: {ATTACKS[name]}")
    return ATTACKS.add(name, cls)


def attack_params(cls: type[Attack]) -> list[str]:
    """The names of ``cls``'s keyword-only hyperparameters."""
    return keyword_params(cls)


def build_attack(name: str, params: Mapping[str, Any] | None = None) -> Attack:
    """The attack ``name`` configured with ``params``; GauntletError if either is bad."""
    # Constructors validate values themselves and raise GauntletError.
    return configure(ATTACKS, name, params)


def validate_attack(name: str, params: Mapping[str, Any] | None, threat: Threat | None) -> None:
    """Submit-time check of an attack, its parameters and its threat model.

    Every attack except "clean" needs a threat; "clean" ignores one if given.
    """
    attack = build_attack(name, params)
    if attack.needs_threat:
        if threat is None:
            raise GauntletError(f"The {name!r} attack needs a threat (norm and eps)")
        check_threat(threat)
        attack.check(threat)
