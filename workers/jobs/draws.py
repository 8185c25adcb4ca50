"""The protocol for randomized defenses: AutoAttack's ``rand`` and repeated judging.

A randomized defense answers each query with a fresh draw, so one lucky draw says little.
Three rules follow (Croce & Hein 2020, AutoAttack's ``rand`` version, and its repeated
evaluation):

- ``autoattack`` behind a randomized defense, attacked adaptively, runs the ``rand``
  version on an EOT surface of ``RAND_EOT_ITER`` (20) draws, whatever version was asked;
- the attacks keep attacking for their whole budget (the EOT surface says so with
  ``stop_early = False``);
- a point counts as robust only if the defended model answers its adversarial input
  correctly on each of ``draws`` fresh draws (the job's ``draws``, 10 by default).
  Clean accuracy stays the first draw's (a clean input is not attacked; the share
  right on every draw is kept too), and the mean and spread of the single-draw robust
  accuracies are kept with the job.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.ensemble import RAND_EOT_ITER
from gauntlet.workers.results import Metric

DEFAULT_DRAWS = 10
MAX_DRAWS = 1000

# decide(defended, x, batch_size) -> (prediction, accepted): one draw of the deployed model.
Decide = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def is_randomized(defended) -> bool:
    return bool(getattr(defended, "randomized", False))


def draws_of(spec: dict, defended) -> int:
    """Fresh draws a point must survive: the job's ``draws`` behind a randomized defense,
    else 1 (a deterministic model answers every draw alike)."""
    draws = spec.get("draws", DEFAULT_DRAWS)
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= MAX_DRAWS:
        raise GauntletError(
            f"Expected `draws` to be an integer in [1, {MAX_DRAWS}], but got {draws!r}"
        )
    return draws if is_randomized(defended) else 1


def rand_switch(spec: dict, defended) -> bool:
    """Whether this job is ``autoattack`` run adaptively on a randomized defense."""
    adaptive = spec.get("adaptive", True)
    return spec.get("attack") == "autoattack" and adaptive and is_randomized(defended)


def attack_params(spec: dict, defended, params: dict) -> dict:
    """The attack's parameters, with ``version: rand`` where ``rand_switch`` holds."""
    return {**params, "version": "rand"} if rand_switch(spec, defended) else params


def eot_samples(spec: dict, defended) -> int:
    """Draws the eval's EOT surface averages: the reference's 20 for ``rand``."""
    return RAND_EOT_ITER if rand_switch(spec, defended) else spec.get("eot_samples", 10)


def judge_draws(decide: Decide, defended, x, x_adv, y, batch_size: int, draws: int):
    """(clean, robust, rejected, per-draw clean, per-draw robust) over ``draws`` draws.

    A rejected clean input is not a correct answer; a rejected adversarial input is a
    defended one. ``clean`` and ``rejected`` ((n, 2): clean input, adversarial one) are
    the first draw's, the usual single-draw numbers; ``robust`` needs a clean-correct
    first draw and the adversarial input answered correctly (or refused) on every draw.
    Per draw (each (draws, n)): clean-correct, and robust as that draw alone judges it.
    """
    per_clean, per_robust, held_all = [], [], None
    rejected = None
    for _ in range(draws):
        pred, accepted = decide(defended, x, batch_size)
        pred_adv, accepted_adv = decide(defended, x_adv, batch_size)
        clean = (pred == y) & accepted
        held = (pred_adv == y) | ~accepted_adv
        per_clean.append(clean)
        per_robust.append(clean & held)
        held_all = held if held_all is None else held_all & held
        if rejected is None:
            rejected = torch.stack([~accepted, ~accepted_adv], dim=1)
    clean = per_clean[0]
    return clean, clean & held_all, rejected, torch.stack(per_clean), torch.stack(per_robust)


def draw_summary(per_clean: torch.Tensor, per_robust: torch.Tensor) -> tuple[Metric, dict]:
    """The mean single-draw robust accuracy as a metric, and per-draw details."""
    k, n = per_robust.shape
    robust = per_robust.float().mean(dim=1) if n else torch.zeros(k)
    mean = float(robust.mean())
    std = float(robust.std(unbiased=False)) if k > 1 else 0.0
    details = {
        "k": k,
        "robust_accuracy": [round(float(a), 6) for a in robust],
        "mean": mean,
        "std": std,
        # Clean-correct on every draw: how often the model is right whatever it draws.
        "clean_accuracy_all_draws": float(per_clean.all(dim=0).float().mean()) if n else 0.0,
    }
    return Metric("robust_accuracy_mean_draw", mean, n), details
