"""Defenses: wrappers around a classifier, registered by name.

Importing this package imports every module in it; each built-in defense registers
itself with ``register_defense``, as a third-party defense would.
"""

import importlib
import pkgutil

from gauntlet.workers.defenses.base import (
    DEFENSES,
    Defense,
    build_defense,
    register_defense,
    validate_defense,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFENSES", "Defense", "build_defense", "register_defense", "validate_defense"]
