"""Adaptive attacks on defenses: BPDA for non-differentiable ones, EOT for random ones.

``attack_surface`` returns the module an attack should take gradients through, given
a defended model; the robust outcome is always judged on the defended model itself.
"""

from __future__ import annotations

import torch

from gauntlet.workers.defenses.base import Defense


class BPDA(torch.nn.Module):
    """Forward through the defense; backward through the identity in its place."""

    def __init__(self, defense: Defense):
        super().__init__()
        self.defense = defense

    def forward(self, x):
        return self.defense.bpda_forward(x)


class EOT(torch.nn.Module):
    """Expectation over transformation: the mean of ``samples`` random forward passes.

    Averaging logits makes the gradient the mean of per-draw gradients (Athalye et al.
    2018), at ``samples`` times the cost of one pass.
    """

    # Attacks read this: a misclassifying pass on a random model may be a lucky draw, so
    # they optimise for all their steps instead of stopping at the first success.
    stop_early = False

    def __init__(self, model: torch.nn.Module, samples: int):
        super().__init__()
        self.model = model
        self.samples = samples

    def forward(self, x):
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(dim=0)


def attack_surface(model: torch.nn.Module, *, adaptive: bool, eot_samples: int = 10):
    """(module to attack, what was done) for ``model``, defended or not."""
    oblivious = getattr(model, "oblivious_surface", None)
    if not adaptive and isinstance(model, Defense) and oblivious is not None:
        # A defense whose own threat model is an attacker unaware of it (PRN: perturbations
        # crafted on the bare classifier) names that surface; the rest are attacked as
        # deployed, masked gradients and all.
        return oblivious(), ["bare-model"]
    if not adaptive or not isinstance(model, Defense):
        return model, []
    used = []
    surface: torch.nn.Module = model
    if not model.differentiable:
        surface, used = BPDA(model), ["bpda"]
    if model.randomized:
        surface, used = EOT(surface, eot_samples), [*used, f"eot-{eot_samples}"]
    return surface, used
