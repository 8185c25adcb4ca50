"""Adversarial attacks: the contract, the registry and the built-in attacks.

Importing this package registers the built-ins ("clean", "fgsm", "pgd").
"""

from workers.attacks.base import Attack, AttackResult, Threat, check_threat
from workers.attacks.clean import Clean
from workers.attacks.pgd import FGSM, PGD
from workers.attacks.registry import ATTACKS, build_attack, register_attack, validate_attack

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
