"""Training on poisoned data (BadNets, Gu et al. 2017, arXiv 1708.06733), and the loop
the defenses share.

``workers.training.train_classifier`` trains a fresh architecture only; the defenses
here start from an existing model, train only some of its parameters (transfer learning
with frozen features) or use another loss (distillation), so ``fit`` is a small loop of
the same kind (Adam, seeded shuffles, ``progress(epoch, epochs)`` after each epoch) that
allows those. Every model in and out of this package is pixel-space (``Normalized``):
triggers are defined on [0, 1] images, and the spec travels with the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.architectures import build_architecture
from gauntlet.workers.backdoor._checks import (
    expect_float,
    expect_images,
    expect_int,
    expect_labels,
    expect_model,
)
from gauntlet.workers.backdoor.poison import PoisonedData, poison_dataset
from gauntlet.workers.backdoor.triggers import Trigger
from gauntlet.workers.models import InputSpec, Normalized

Progress = Callable[[int, int], None]
# loss(model, xb, yb, idx): the batch loss; idx are the batch's positions in the data.
BatchLoss = Callable[[Normalized, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fresh_model(arch: str, spec: InputSpec, seed: int, device: torch.device | str = "cpu"):
    """A newly initialised ``arch`` for ``spec``, wrapped in ``Normalized``; seeded."""
    torch.manual_seed(expect_int("seed", seed, 0))  # as train_classifier: seeded init
    return Normalized(build_architecture(arch, spec), spec).to(device)


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


def fit(
    model: Normalized,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    loss: BatchLoss | None = None,
    train_mode: bool = True,
    progress: Progress | None = None,
) -> float:
    """Adam on ``parameters`` (default: all) over seeded shuffles; the last batch loss.

    ``train_mode=False`` keeps the network in eval mode while training: with frozen
    features, BatchNorm statistics must not drift on the new data either, or the
    "frozen" layers would change after all.
    """
    model = expect_model("model", model)
    x = expect_images("x", x)
    epochs = expect_int("epochs", epochs, 1, 10_000)
    batch_size = expect_int("batch_size", batch_size, 1)
    lr = expect_float("lr", lr, 0.0, 10.0)
    generator = torch.Generator().manual_seed(expect_int("seed", seed, 0))
    params = list(model.parameters() if parameters is None else parameters)
    if not params:
        raise GauntletError("nothing to train: no parameters were given")
    optimiser = torch.optim.Adam(params, lr=lr)
    loss = loss or (lambda m, xb, yb, idx: F.cross_entropy(m(xb), yb))
    device = model.mean.device
    last = torch.tensor(0.0)
    for epoch in range(epochs):
        model.train(train_mode)
        # CPU generator, indices moved: the same shuffles on any device.
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx.to(x.device)].to(device), y[idx.to(y.device)].to(device)
            last = loss(model, xb, yb, idx)
            optimiser.zero_grad()
            last.backward()
            optimiser.step()
        if progress:
            progress(epoch + 1, epochs)
    model.eval()
    return float(last.detach())


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
