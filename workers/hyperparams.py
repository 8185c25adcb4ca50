"""Hyperparameters declared once, as a table: name, default and check.

Attacks and defenses take their hyperparameters as keyword arguments from user input (a
suite's ``params``). Each class lists them in ``hyperparams``, in the order ``repr``
shows them; the shared constructor checks every value with the table's check (one
message template for the whole project), stores it as an attribute of its name and then
calls ``prepare()`` for derived values and checks across parameters. ``config`` (the
source of ``repr`` and of job keys) and the list of accepted parameters in error
messages follow the same table, so the three can never disagree.

A third-party class may instead write its own constructor with keyword-only arguments;
``keyword_params`` then reads the signature.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gauntlet.cluster.errors import GauntletError

F = TypeVar("F", bound=Callable[..., Any])


def expect_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise GauntletError(f"Expected `{name}` to be an integer {bound}, but got {value!r}")
    return value


def expect_float(name: str, value: Any, low: float, high: float) -> float:
    """A float in (low, high]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low < value <= high:
        raise GauntletError(
            f"Expected `{name}` to be a float in ({low:g}, {high:g}], but got {value!r}"
        )
    return float(value)


def expect_range(name: str, value: Any, low: float, high: float, *, open_high: bool) -> float:
    """A float in [low, high] or [low, high): ranges ``expect_float``'s (low, high] misses.

    Momentum 0 (plain BIM) and confidence 0 (the CW default) are meaningful values.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = ok and low <= value and (value < high if open_high else value <= high)
    if not inside:  # NaN fails both comparisons and lands here too
        bracket = ")" if open_high else "]"
        raise GauntletError(
            f"Expected `{name}` to be a float in [{low:g}, {high:g}{bracket}, but got {value!r}"
        )
    return float(value)


def expect_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise GauntletError(f"Expected `{name}` to be true or false, but got {value!r}")
    return value


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its default and ``check(name, value) -> value``."""

    default: Any
    check: Callable[[str, Any], Any]


def integer(default: int, low: int, high: int | None = None) -> Hyper:
    return Hyper(default, lambda name, value: expect_int(name, value, low, high))


def real(default: float | None, low: float, high: float) -> Hyper:
    """A float in (low, high]."""
    return Hyper(default, lambda name, value: expect_float(name, value, low, high))


def span(default: float, low: float, high: float, *, open_high: bool = False) -> Hyper:
    """A float in [low, high] (or [low, high) with ``open_high``)."""
    return Hyper(
        default, lambda name, value: expect_range(name, value, low, high, open_high=open_high)
    )


def flag(default: bool) -> Hyper:
    return Hyper(default, expect_bool)


def one_of(default: str, options: Mapping[str, Any] | tuple[str, ...]) -> Hyper:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            names = [repr(option) for option in options]
            known = " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
            raise GauntletError(f"Expected `{name}` to be {known}, but got {value!r}")
        return value

    return Hyper(default, check)


def optional(hyper: Hyper) -> Hyper:
    """``hyper`` that also takes None (meaning: derive it in ``prepare``); default None."""
    return Hyper(None, lambda name, value: None if value is None else hyper.check(name, value))


def reads_hyperparams(init: F) -> F:
    """Mark a constructor that takes its keyword arguments from the class's table."""
    init.reads_hyperparams = True  # type: ignore[attr-defined]
    return init


def set_hyperparams(obj: Any, params: Mapping[str, Any]) -> None:
    """Check ``params`` against ``type(obj).hyperparams`` and store each as an attribute."""
    table: Mapping[str, Hyper] = type(obj).hyperparams
    for name in params:
        if name not in table:
            # What Python itself says for an unknown keyword argument.
            raise TypeError(f"{type(obj).__name__}() got an unexpected keyword argument {name!r}")
    for name, hyper in table.items():
        setattr(obj, name, hyper.check(name, params.get(name, hyper.default)))


def keyword_params(cls: type) -> list[str]:
    """The names of ``cls``'s hyperparameters: its table, or its keyword-only arguments."""
    if getattr(cls.__init__, "reads_hyperparams", False):
        return list(cls.hyperparams)  # type: ignore[attr-defined]
    signature = inspect.signature(cls.__init__)
    return [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]


def table_config(obj: Any) -> dict[str, Any]:
    """The hyperparameters' current values, in declaration order: the source of ``repr``."""
    return {name: getattr(obj, name) for name in keyword_params(type(obj))}
