"""Checks that an evaluation may be unreliable, stored with each result.

Each returns a short flag string when it fires. They follow the warning signs of
gradient masking listed by Athalye et al. (2018) and Carlini et al. (2019, "On
Evaluating Adversarial Robustness") and the RobustBench admission checks: randomized
outputs, zero or NaN gradients, probabilities in place of logits. The checks that need
several jobs (a black-box attack beating white-box ones, accuracy that does not reach
zero as eps grows) live with the leaderboard and the robustness curve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Share of examples whose input gradient is exactly zero above which we flag: a few
# saturated examples are normal, half of them means the gradient is masked.
ZERO_GRADIENT_SHARE = 0.5


def _input_gradients(model, x, y) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def model_flags(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Flags of the model an attack takes gradients through, on a few points."""
    flags = []
    with torch.no_grad():
        first, second = model(x), model(x)
    if not torch.allclose(first, second, rtol=0, atol=1e-6):
        flags.append("randomized output: two forward passes on one input differ")
    rows = first.sum(dim=1)
    if bool(
        (first >= 0).all()
        and (first <= 1).all()
        and torch.allclose(rows, torch.ones_like(rows), atol=1e-4)
    ):
        flags.append("outputs are probabilities, not logits: cross-entropy attacks are weakened")
    grad = _input_gradients(model, x, y)
    if not torch.isfinite(grad).all():
        flags.append("gradients contain NaN or infinity")
    else:
        zero = (grad.flatten(1).abs().amax(dim=1) == 0).float().mean().item()
        if zero > ZERO_GRADIENT_SHARE:
            flags.append(f"gradients are zero on {zero:.0%} of points (gradient masking)")
    return flags


def attack_flags(attack) -> list[str]:
    """Flags an attack raised while it ran: ``autoattack-fast``'s probe finding that a
    100-query random search beat 100 gradient steps on most points of a batch."""
    if getattr(attack, "masked", 0):
        return [
            f"a black-box probe beat the gradient members on most points in {attack.masked} "
            "batch(es) (gradient masking): the full AutoAttack members ran there"
        ]
    return []


def curve_flags(eps: list[float], robust: list[float], threshold: float = 0.05) -> list[str]:
    """A robustness curve should reach (near) zero at its largest budget."""
    if eps and robust[-1] > threshold:
        return [
            f"robust accuracy is {robust[-1]:.1%} at eps={eps[-1]:g}: it should go to zero "
            "as eps grows (the attack may be failing)"
        ]
    return []
