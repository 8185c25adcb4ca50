"""Training on poisoned data (BadNets, Gu et al. 2017, arXiv 1708.06733), and the model
handling the defenses share.

The training itself is ``workers.training.fit``, the loop every trainer here uses; this
module adds what the backdoor code needs around it: copies of a model that train, and
frozen results. Every model in and out of this package is pixel-space (``Normalized``):
triggers are defined on [0, 1] images, and the spec travels with the model.
"""

from __future__ import annotations

import copy

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor._checks import expect_images, expect_labels, expect_model
from gauntlet.workers.backdoor.poison import PoisonedData, poison_dataset
from gauntlet.workers.backdoor.triggers import Trigger
from gauntlet.workers.models import InputSpec, Normalized
from gauntlet.workers.training import Progress, Schedule, fit, fresh_model

# What the backdoor trainers use unless told otherwise (fine-tuning has its own).
DEFAULTS = Schedule(epochs=10, lr=1e-3, batch_size=64, seed=0)


def trainable_copy(model: Normalized) -> Normalized:
    """A deep copy whose parameters all take gradients (load_classifier freezes them)."""
    model = copy.deepcopy(expect_model("model", model))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def frozen(model: Normalized) -> Normalized:
    """The model in eval mode with no gradients, as ``load_classifier`` hands them out."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_backdoored(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    *,
    rate: float = 0.1,
    mode: str = "all-to-one",
    target: int | None = None,
    arch: str | None = None,
    spec: InputSpec | None = None,
    model: Normalized | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[Normalized, PoisonedData]:
    """BadNets: train on (x, y) with ``rate`` of it stamped and relabelled.

    Start from a fresh ``arch`` (with ``spec``) or from a copy of ``model`` (a
    pixel-space model; it is not modified). Seeded: the poison picks, the initialisation
    and the shuffles. ``rate=0`` trains a clean reference model the very same way.
    Returns the trained model (eval mode, frozen) and the poisoned training set.
    """
    if (arch is None) == (model is None):
        raise GauntletError("give either `arch` (with `spec`) or a starting `model`, not both")
    if model is not None:
        start = trainable_copy(model)
    else:
        if not isinstance(spec, InputSpec):
            raise GauntletError(f"training from `arch` needs an InputSpec `spec`, got {spec!r}")
        start = fresh_model(arch, spec, seed, x.device)
    num_classes = start.spec.num_classes
    expect_labels("y", y, len(expect_images("x", x)), num_classes)
    if tuple(x.shape[1:]) != (start.spec.channels, start.spec.height, start.spec.width):
        raise GauntletError(
            f"the images are {tuple(x.shape[1:])}, but the model takes "
            f"{(start.spec.channels, start.spec.height, start.spec.width)}"
        )
    poisoned = poison_dataset(
        x, y, trigger, rate=rate, num_classes=num_classes, mode=mode, target=target, seed=seed
    )
    fit(
        start,
        poisoned.x,
        poisoned.y,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return frozen(start), poisoned
