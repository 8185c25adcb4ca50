"""Model cards: what a submitter claims about a model, checked and stored beside it.

A card uses RobustBench's ``model_info`` field names, so a card written for a
RobustBench entry can be submitted as it is, and ``gauntlet export --format
robustbench`` writes the same fields back with the measured numbers filled in. The
card is user text stored in SQL and printed in tables: every field's type is checked,
strings are bounded, and a field gauntlet does not know is refused rather than kept,
since a misspelt ``reported`` would otherwise vanish silently.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Model

# A card is a few hundred bytes; anything far larger is not a card.
MAX_CARD_BYTES = 65536
MAX_TEXT = 2000

_TEXT = "text"
_ACCURACY = "accuracy"  # a percentage, as RobustBench writes it ("62.80" or 62.8)
_FLAG = "flag"
_COUNT = "count"
_EPS = "eps"

# RobustBench's model_info fields (plus ``dataset``, ``threat_model`` and ``notes``).
FIELDS: dict[str, str] = {
    "name": _TEXT,
    "authors": _TEXT,
    "link": _TEXT,
    "venue": _TEXT,
    "architecture": _TEXT,
    "dataset": _TEXT,
    "threat_model": _TEXT,
    "eps": _EPS,
    "clean_acc": _ACCURACY,
    "reported": _ACCURACY,
    "autoattack_acc": _ACCURACY,
    "additional_data": _FLAG,
    "number_forward_passes": _COUNT,
    "unreliable": _FLAG,
    # Not RobustBench's: a random model (dropout at test time, a random defense) skips
    # the submission gate's determinism check and is attacked with EOT.
    "randomized": _FLAG,
    "footnote": _TEXT,
    "notes": _TEXT,
}


def load_card(path: str | Path) -> dict[str, Any]:
    """Read a card from a YAML or JSON file (JSON is YAML) and check it."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise GauntletError(
                f"model card {str(path)!r} has {size:,} bytes; a card holds at most "
                f"{MAX_CARD_BYTES:,}"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GauntletError(f"model card {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise GauntletError(f"model card {str(path)!r} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GauntletError(f"cannot read model card {str(path)!r}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GauntletError(f"model card {str(path)!r} is not YAML or JSON: {exc}") from None
    return check_card(data, where=f"model card {str(path)!r}")


def check_card(data: Any, where: str = "model card") -> dict[str, Any]:
    """The card as stored: known fields only, each of its type; GauntletError otherwise."""
    if not isinstance(data, dict):
        raise GauntletError(f"Expected the {where} to be a mapping, but got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise GauntletError(
            f"{where} has unknown fields {', '.join(unknown)}; known: {', '.join(FIELDS)}"
        )
    card = {}
    for key, value in data.items():
        if value is None:
            continue  # RobustBench writes null for "not given"
        card[key] = _check_value(where, key, FIELDS[key], value)
    # JSON round trip: what is stored must be exactly what a reader gets back.
    return json.loads(json.dumps(card))


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(where: str, key: str, kind: str, value: Any):
    bad = f"Expected `{key}` in the {where} to be"
    if kind == _TEXT:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise GauntletError(f"{bad} a string of at most {MAX_TEXT} characters, got {value!r}")
        # Newlines are fine in notes; other control characters would garble a terminal.
        if any(not c.isprintable() and c not in "\n\t" for c in value):
            raise GauntletError(f"{bad} printable text, but got {value!r}")
        return value
    if kind == _FLAG:
        if not isinstance(value, bool):
            raise GauntletError(f"{bad} true or false, but got {value!r}")
        return value
    if kind == _COUNT:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GauntletError(f"{bad} a positive integer, but got {value!r}")
        return value
    if kind == _EPS:
        if isinstance(value, str):
            return _fraction(bad, value)
        if not _number(value) or value < 0:
            raise GauntletError(f"{bad} a non-negative number such as 8/255, got {value!r}")
        return float(value)
    # An accuracy: RobustBench writes percentages as strings ("62.80"); keep the number.
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip().rstrip("%"))
        except ValueError:
            raise GauntletError(f"{bad} an accuracy (a number), but got {value!r}") from None
    if not _number(number) or not 0 <= number <= 100:
        raise GauntletError(f"{bad} an accuracy between 0 and 100, but got {value!r}")
    return float(number)


def _fraction(bad: str, text: str) -> float:
    top, sep, bottom = text.partition("/")
    try:
        value = float(top) / float(bottom) if sep else float(top)
    except (ValueError, ZeroDivisionError):
        raise GauntletError(f"{bad} a number such as 8/255, but got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise GauntletError(f"{bad} a non-negative number such as 8/255, but got {text!r}")
    return value


def accuracy_fraction(value: float | None) -> float | None:
    """A card accuracy (a percentage) as the fraction the leaderboard uses."""
    return None if value is None else value / 100


def store_card(engine: sa.Engine, model_id: str, card: dict | None) -> None:
    """Set the model's card; a later submission with a card replaces the earlier one."""
    if card is None:
        return
    with engine.begin() as conn:
        conn.execute(sa.update(Model).where(Model.id == model_id).values(card=card))
