"""Target classes for targeted attacks, and the ``target`` hyperparameter they share.

A targeted attack needs one class per example other than its label. Three common
choices: "random" (Carlini & Wagner 2017: the usual one for evaluations), "least-likely"
(Kurakin et al. 2017's iterative least-likely class method: the hardest target) and
"next" ((y + 1) mod K: deterministic and cheap, handy for tests and comparisons).
"""

from __future__ import annotations

from typing import Any

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.hyperparams import Hyper

TARGET_MODES = ("random", "least-likely", "next")


def expect_target(name: str, value: Any) -> str:
    """``value`` if it is a known target mode, else GauntletError."""
    if not isinstance(value, str) or value not in TARGET_MODES:
        known = ", ".join(repr(mode) for mode in TARGET_MODES)
        raise GauntletError(f"Expected `{name}` to be one of {known}, but got {value!r}")
    return value


# The ``target`` hyperparameter of targeted attacks.
TARGET = Hyper("random", expect_target)


def choose_targets(
    mode: str, logits: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One target class per example, never equal to ``y``.

    ``logits`` are the model's outputs on the clean points (they give K and the
    least-likely class). "random" draws from ``generator`` on its own device, as the
    norms do, so a seed gives the same targets on CPU and GPU.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise GauntletError("A targeted attack needs a model with at least 2 classes")
    if mode == "next":
        return (y + 1) % num_classes
    if mode == "least-likely":
        # Masking y matters only for degenerate logits (all equal), where argmin could be y.
        masked = logits.detach().clone()
        masked[torch.arange(len(y), device=y.device), y] = torch.inf
        return masked.argmin(dim=1)
    if mode == "random":
        # An offset in [1, K) from y is uniform over the other K - 1 classes.
        device = generator.device if generator is not None else y.device
        offset = torch.randint(1, num_classes, (len(y),), generator=generator, device=device)
        return (y + offset.to(y.device)) % num_classes
    raise GauntletError(f"Unknown target mode {mode!r}")  # constructors validated it first


def pick_targets(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Targets from the model's clean logits (one forward pass, no gradient)."""
    with torch.no_grad():
        logits = model(x)
    return choose_targets(mode, logits, y, generator)


def reached(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Where an attack is done: misclassified (untargeted) or on the target (targeted).

    Hitting a target other than ``y`` is a misclassification, so a targeted success is
    also a success for robust accuracy.
    """
    pred = logits.argmax(dim=1)
    return pred != y if targets is None else pred == targets
