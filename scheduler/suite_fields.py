"""The type checks of a suite file's fields, before any of them is used.

A suite is user input (``--suite my.yaml``), and YAML reads ``n: lots`` as a string and
``eot_samples: ten`` just as happily as numbers. Each field is checked here for its type
and range, and every message names the suite, the evaluation (by position and attack)
and the field, so a wrong type is one clear line and never an exception from deep
inside the expansion.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.spec import MAX_SEED, check_timeout
from gauntlet.workers.hyperparams import expect_int

EVAL_FIELDS = (
    "attack",
    "norm",
    "eps",
    "params",
    "eps_sweep",
    "eot_samples",
    "draws",
    "adaptive",
    "kind",
    "timeout_s",
    "shard_size",
)
TRANSFER_FIELDS = ("attack", "norm", "eps", "params", "ensemble", "timeout_s")
DEFENSE_FIELDS = ("name", "params")


def number(value: Any, what: str, where: str | None = None) -> float:
    """Accept 0.1, "0.1" or "8/255" (how papers write Linf budgets)."""
    try:
        if isinstance(value, bool):  # Fraction("True") fails anyway; say why in words
            raise ValueError
        return float(Fraction(str(value).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        prefix = f"{where}: " if where else ""
        raise GauntletError(
            f"{prefix}Expected `{what}` to be a number such as 0.1 or 8/255, but got {value!r}"
        ) from None


def integer(where: str, field: str, value: Any, low: int, high: int | None = None) -> int:
    try:
        return expect_int(field, value, low, high)
    except GauntletError as exc:
        raise GauntletError(f"{where}: {exc}") from None


def text(where: str, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise GauntletError(f"{where}: Expected `{field}` to be a string, but got {value!r}")
    return value


def mapping(where: str, field: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GauntletError(f"{where}: Expected `{field}` to be a mapping, but got {value!r}")
    return value


def _known_keys(where: str, what: str, item: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(map(str, set(item) - set(allowed)))
    if unknown:
        raise GauntletError(
            f"{where}: unknown {what} key(s) {', '.join(unknown)}; known: {', '.join(allowed)}"
        )


def suite_header(data: dict, name: str) -> dict:
    """The suite-wide fields, checked: name, description, n, seed, batch_size, eps, ..."""
    where = f"suite {name!r}"
    eps = mapping(where, "eps", data.get("eps"))
    for norm, table in eps.items():
        if not isinstance(table, dict):
            raise GauntletError(
                f"{where}: Expected `eps.{norm}` to be a mapping of dataset to budget "
                f"(with `default`), but got {table!r}"
            )
        for dataset, value in table.items():
            number(value, f"eps.{norm}.{dataset}", where)
    return {
        "name": text(where, "name", data.get("name", name)),
        "description": text(where, "description", data.get("description") or ""),
        "n": integer(where, "n", data.get("n", 200), 1),
        "seed": integer(where, "seed", data.get("seed", 0), 0, MAX_SEED),
        "batch_size": integer(where, "batch_size", data.get("batch_size", 256), 1),
        "eps": eps,
        "resources": mapping(where, "resources", data.get("resources")),
        "shard_size": shard_size(where, data),
    }


def shard_size(where: str, item: dict) -> int | None:
    """Points per shard (``workers.shards``), where the suite or an evaluation sets it."""
    value = item.get("shard_size")
    return None if value is None else integer(where, "shard_size", value, 1)


def evaluation(where: str, item: Any, allowed: tuple[str, ...] = EVAL_FIELDS) -> dict:
    """One evaluation (or the transfer section), its types checked; returned as given."""
    if not isinstance(item, dict) or "attack" not in item:
        raise GauntletError(
            f"{where}: Expected a mapping with `attack` and optionally "
            f"{', '.join(f for f in allowed if f != 'attack')}, but got {item!r}"
        )
    _known_keys(where, "evaluation", item, allowed)
    text(where, "attack", item["attack"])
    for field in ("norm", "kind"):
        if item.get(field) is not None:
            text(where, field, item[field])
    mapping(where, "params", item.get("params"))
    if item.get("eps") is not None:
        number(item["eps"], "eps", where)
    sweep = item.get("eps_sweep")
    if sweep is not None:
        if not isinstance(sweep, list) or not sweep:
            raise GauntletError(
                f"{where}: Expected `eps_sweep` to be a list of multiples of the budget, "
                f"but got {sweep!r}"
            )
        for multiple in sweep:
            if not number(multiple, "eps_sweep", where) > 0:
                raise GauntletError(
                    f"{where}: Expected `eps_sweep` multiples above 0, but got {multiple!r}"
                )
        if item.get("norm") is None:
            raise GauntletError(
                f"{where}: `eps_sweep` needs a `norm`: it lists multiples of that norm's budget"
            )
    for field in ("eot_samples", "draws"):
        if field in item:
            integer(where, field, item[field], 1, 1000)
    check_timeout(item.get("timeout_s"), where)
    shard_size(where, item)
    for field in ("adaptive", "ensemble"):
        if item.get(field) is not None and not isinstance(item[field], bool):
            raise GauntletError(
                f"{where}: Expected `{field}` to be true or false, but got {item[field]!r}"
            )
    return item


def evaluations(items: Any, name: str) -> list[dict]:
    if not items:
        raise GauntletError(f"suite {name!r} lists no evaluations")
    if not isinstance(items, list):
        raise GauntletError(
            f"suite {name!r}: Expected `evaluations` to be a list, but got {items!r}"
        )
    return [evaluation(evaluation_label(name, i, item), item) for i, item in enumerate(items, 1)]


def evaluation_label(suite: str, position: int, item: Any) -> str:
    """How messages name an evaluation: its suite, its position and its attack."""
    attack = item.get("attack") if isinstance(item, dict) else None
    named = f" ({attack})" if isinstance(attack, str) else ""
    return f"suite {suite!r}, evaluation {position}{named}"


def transfer(item: Any, suite: str) -> dict | None:
    if item is None:
        return None
    where = f"suite {suite!r}, transfer"
    if not isinstance(item, dict) or "norm" not in item:
        raise GauntletError(
            f"{where}: Expected a mapping with `attack`, `norm` and optionally `params`, "
            f"`eps` and `ensemble`, but got {item!r}"
        )
    return evaluation(where, item, TRANSFER_FIELDS)


def defenses(items: Any, suite: str) -> list:
    if items is None:
        return [None]
    if not isinstance(items, list):
        raise GauntletError(f"suite {suite!r}: Expected `defenses` to be a list, but got {items!r}")
    parsed = []
    for position, item in enumerate(items, 1):
        where = f"suite {suite!r}, defense {position}"
        if item is not None and not (isinstance(item, dict) and "name" in item):
            raise GauntletError(
                f"{where}: each of `defenses` is null (no defense) or a mapping with "
                f"`name` and optional `params`, but got {item!r}"
            )
        if item is not None:
            _known_keys(where, "defense", item, DEFENSE_FIELDS)
            text(where, "name", item["name"])
            mapping(where, "params", item.get("params"))
        parsed.append(item)
    return parsed
