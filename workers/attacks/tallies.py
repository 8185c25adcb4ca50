"""Counts an attack keeps over a job's batches, carried through checkpoints and shards.

An ensemble counts the points each member broke (``breakdown``, a dict by member);
``autoattack-fast`` counts the batches its probe found masked (``masked``). The attack
object sees only the batches run in its own process: a job resumed from a checkpoint,
or split into shards, must add the counts of the batches run elsewhere, so the counts
travel with the per-example state, flat (``breakdown/apgd-ce``, ``masked``).
"""

from __future__ import annotations

import torch

COUNTED = ("breakdown", "masked")  # the attack attributes that are counts
_STATE = "tally/"  # their keys' prefix in a checkpoint's tensors


def counts(attack) -> dict[str, int]:
    """The attack's counts, flat."""
    flat: dict[str, int] = {}
    for name in COUNTED:
        value = getattr(attack, name, None)
        if isinstance(value, dict):
            flat.update({f"{name}/{key}": int(count) for key, count in value.items()})
        elif isinstance(value, int):
            flat[name] = value
    return flat


def restore(attack, flat: dict[str, int]) -> None:
    """Set the attack's counts to ``flat`` (as ``counts`` gives them)."""
    for key, count in flat.items():
        name, _, member = key.partition("/")
        if member:
            getattr(attack, name)[member] = int(count)
        else:
            setattr(attack, name, int(count))


def total(shards: list[dict[str, int]]) -> dict[str, int]:
    """The counts of several shards, added up."""
    summed: dict[str, int] = {}
    for flat in shards:
        for key, count in flat.items():
            summed[key] = summed.get(key, 0) + int(count)
    return summed


def to_state(attack) -> dict[str, torch.Tensor]:
    """The counts as checkpoint tensors."""
    return {_STATE + key: torch.tensor(count) for key, count in counts(attack).items()}


def from_state(attack, state: dict[str, torch.Tensor]) -> None:
    """Restore the counts a checkpoint saved."""
    saved = {k[len(_STATE) :]: int(v) for k, v in state.items() if k.startswith(_STATE)}
    restore(attack, saved)
