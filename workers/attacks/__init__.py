"""Adversarial attacks: the contract, the registry and the built-in attacks.

Importing this package imports every module in it, and each built-in attack registers
itself with ``register_attack`` there, exactly as a third-party attack would.
"""

import importlib
import pkgutil

from gauntlet.workers.attacks.base import Attack, AttackResult, Threat, check_threat
from gauntlet.workers.attacks.clean import Clean
from gauntlet.workers.attacks.pgd import FGSM, PGD
from gauntlet.workers.attacks.registry import (
    ATTACKS,
    build_attack,
    register_attack,
    validate_attack,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ATTACKS",
    "FGSM",
    "PGD",
    "Attack",
    "AttackResult",
    "Clean",
    "Threat",
    "build_attack",
    "check_threat",
    "register_attack",
    "validate_attack",
]
