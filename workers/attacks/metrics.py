"""Metrics of one attack run, each with its sample size and a 95% Wilson interval.

Conventions (see REFERENCES.md): only correctly classified points are attacked, so the
success rate is fooled / attacked, not fooled / all; the normalised L2 dissimilarity
is averaged over successful examples only, since a failed attack's x_adv says nothing
about how close the nearest adversarial example is.
"""

from __future__ import annotations

import torch

from gauntlet.workers.attacks.base import AttackResult
from gauntlet.workers.results import Metric, wilson_interval


def _proportion(name: str, k: int, n: int) -> Metric:
    low, high = wilson_interval(k, n)
    return Metric(name, k / n if n else 0.0, n, low, high)


def mean_normalised_l2(x: torch.Tensor, x_adv: torch.Tensor, mask: torch.Tensor) -> Metric:
    """Mean ||x' - x||_2 / ||x||_2 over the examples in ``mask``.

    An all-zero image has no defined normalised distance; it is left out (and not
    counted in n) rather than turning the mean into infinity.
    """
    x, x_adv = x[mask].flatten(1).double(), x_adv[mask].flatten(1).double()
    base = x.norm(p=2, dim=1)
    defined = base > 0
    ratios = (x_adv - x)[defined].norm(p=2, dim=1) / base[defined]
    n = int(ratios.numel())
    return Metric("mean_normalised_l2", float(ratios.mean()) if n else 0.0, n)


def attack_metrics(x: torch.Tensor, result: AttackResult) -> list[Metric]:
    """clean_accuracy, robust_accuracy, success_rate and mean_normalised_l2 of ``result``."""
    n = int(result.clean_correct.numel())
    if x.shape[0] != n or result.robust.shape != result.clean_correct.shape:
        raise ValueError(
            f"Expected {n} inputs and outcomes, but got x of {x.shape[0]} "
            f"and robust of {tuple(result.robust.shape)}"
        )
    clean = result.clean_correct.detach().cpu().bool()
    # A point the model gets wrong is never robust, whatever the attack reported.
    robust = result.robust.detach().cpu().bool() & clean
    fooled = clean & ~robust
    attacked = int(clean.sum())
    metrics = [
        _proportion("clean_accuracy", attacked, n),
        _proportion("robust_accuracy", int(robust.sum()), n),
        _proportion("success_rate", int(fooled.sum()), attacked),
        mean_normalised_l2(x.detach().cpu(), result.x_adv.detach().cpu(), fooled),
    ]
    if result.queries is not None and attacked:
        # Black-box cost: queries per attacked point, and per successful one.
        queries = result.queries.detach().cpu().double()
        metrics.append(Metric("mean_queries", float(queries[clean].mean()), attacked))
        if int(fooled.sum()):
            metrics.append(
                Metric("mean_queries_success", float(queries[fooled].mean()), int(fooled.sum()))
            )
    return metrics
