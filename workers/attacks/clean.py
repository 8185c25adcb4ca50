"""The "clean" attack: no perturbation, so robust accuracy is clean accuracy.

It goes through the same contract and registry as real attacks, so a suite's clean
baseline is stored, batched and reported exactly like any attack result.
"""

from __future__ import annotations

import torch

from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.attacks.registry import register_attack


@register_attack
class Clean(Attack):
    """x_adv = x; takes no threat (one given is ignored) and spends no gradients."""

    name = "clean"
    needs_threat = False

    def run(self, model, x, y, threat, generator) -> RunOutput:
        # The base only passes points the model already classifies correctly.
        return RunOutput(x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device))
