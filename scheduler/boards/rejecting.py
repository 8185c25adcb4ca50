"""What a rejecting defense's (DkNN's) results count for on the leaderboard.

A rejected adversarial input is a defended one only if the attack was trying to get a
wrong answer *accepted*: the adaptive, feature-space attack (``dknn-feature-space`` in a
job's ``adaptations``). An attack on the bare network's logits is rejected for reasons it
never tried to avoid, so its rejections alone prove nothing. The rule, per entry:

- with at least one adaptive result in the table, every result counts as stored
  (rejected = defended): a point is robust only if it also survived the adaptive attack,
  so a rejection is credited exactly where the adaptive attack failed as well;
- without one, no rejection is credited (rejected = broken), and the entry is flagged,
  so it is never shown as reliable on non-adaptive evidence alone.

The non-adaptive column of a rejecting entry never credits rejections either.
"""

from __future__ import annotations

import numpy as np

from gauntlet.workers.results import unpack

NO_ADAPTIVE = "rejecting defense without the adaptive feature-space attack: rejections not credited"


def _adaptation() -> str:
    from gauntlet.workers.attacks.dknn_adaptive import ADAPTATION

    return ADAPTATION


def _rejecting_classes() -> set[str]:
    from gauntlet.workers.defenses import DEFENSES

    return {cls.__name__ for _, cls in DEFENSES.items() if cls.rejects}


def is_rejecting(run) -> bool:
    """Whether ``run`` evaluated a rejecting defense (older results lack the stored bits,
    so the defense's class name in its configuration decides for them)."""
    if "rejected" in (run.details or {}):
        return True
    return bool(run.defense) and run.defense.split("(")[0] in _rejecting_classes()


def is_adaptive(run) -> bool:
    """Whether ``run`` attacked the rejecting defense for an accepted wrong answer."""
    return _adaptation() in ((run.details or {}).get("adaptations") or [])


def _rejected(run, column: str, n: int) -> np.ndarray | None:
    bits = ((run.details or {}).get("rejected") or {}).get(column)
    return None if bits is None else unpack(bytes.fromhex(bits), n)


def robust_bits(run, n: int, *, credit: bool) -> np.ndarray:
    """The run's robust bits as the board counts them; ``credit``: rejections count as
    defended (the entry has an adaptive result)."""
    robust = unpack(run.robust, n)
    if credit or not is_rejecting(run):
        return robust
    rejected = _rejected(run, "adversarial", n)
    # An older result without the bits cannot be corrected; the entry's flag says so.
    return robust if rejected is None else robust & ~rejected


def rejected_clean(runs: list, clean_run, n: int) -> float | None:
    """Share of clean inputs rejected: from the clean run when it stored it, else any run."""
    for run in [clean_run, *runs]:
        if run is not None and run.n == n:
            rejected = _rejected(run, "clean", n)
            if rejected is not None:
                return float(np.count_nonzero(rejected)) / n if n else 0.0
    return None
