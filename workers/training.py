"""The one training loop: every way this service trains or retrains a network.

``fit`` is Adam over seeded shuffles of (x, y). What differs between the callers is
passed in rather than written as another loop:

- ``perturb`` makes the batch that is trained on: adversarial training (``adversarial``,
  with the attack classes of ``workers.attacks``), ensemble adversarial training;
- ``loss`` scores the logits against the batch's targets: distillation
  (``distillation_loss``, the targets being soft labels), training at a temperature;
- ``params`` and ``train_mode`` pick what trains: fine-tuning, transfer learning with
  frozen features.

Callers: ``train_classifier`` here (the demo's models, benchmarks, tests), the ``train``
job kind (``workers.jobs.train``), the backdoor attack and defenses
(``workers.backdoor``) and the PATE teachers and student (``workers.jobs.pate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.architectures import build_architecture
from gauntlet.workers.attacks.base import Attack, Threat
from gauntlet.workers.attacks.pgd import PGD
from gauntlet.workers.batches import predict_in_batches
from gauntlet.workers.hyperparams import expect_float, expect_int
from gauntlet.workers.models import InputSpec, Normalized

Progress = Callable[[int, int], None]
# perturb(model, xb, yb) -> the images to train on, crafted with the model in eval mode.
Perturb = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# loss(logits, targets) -> the batch loss; targets are y's rows (labels or soft labels).
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Schedule(TypedDict, total=False):
    """The settings a wrapper takes as keywords and hands to ``fit`` unchanged."""

    epochs: int
    lr: float
    batch_size: int
    seed: int
    progress: Progress | None


# FGSM from a random start (Wong et al. 2020, "Fast is better than free"): one step of
# 1.25 eps from a uniform point of the ball. The random start is what keeps single-step
# training from collapsing into gradient masking, which plain FGSM training is known to do.
FGSM_RANDOM_START = PGD(norm="linf", steps=1, rel_stepsize=1.25)


def fresh_model(
    arch: str, spec: InputSpec, seed: int | None, device: torch.device | str = "cpu"
) -> Normalized:
    """A newly initialised ``arch`` for ``spec``, wrapped in ``Normalized``.

    ``seed`` reseeds torch's global generator first (a seeded initialisation); None
    continues its stream, for a second network of one seeded run.
    """
    if seed is not None:
        torch.manual_seed(expect_int("seed", seed, 0))
    return Normalized(build_architecture(arch, spec), spec).to(device)


def fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    generator: torch.Generator | None = None,
    perturb: Perturb | None = None,
    loss: Loss | None = None,
    params: Iterable[torch.nn.Parameter] | None = None,
    train_mode: bool = True,
    progress: Progress | None = None,
) -> float:
    """Adam on ``params`` (default: all) over shuffled mini-batches; the last batch loss.

    The shuffles come from ``generator``, or from a CPU generator seeded with ``seed``;
    pass the generator when ``perturb`` draws from it too, so that one seed fixes the
    whole run. Batches move to the model's device. ``train_mode=False`` keeps the
    network in eval mode while training: with frozen features, BatchNorm statistics must
    not drift on the new data either, or the "frozen" layers would change after all.
    ``progress(epoch, epochs)`` after each epoch. The model is left in eval mode.
    """
    epochs = expect_int("epochs", epochs, 1, 10_000)
    batch_size = expect_int("batch_size", batch_size, 1)
    lr = expect_float("lr", lr, 0.0, 10.0)
    if generator is None:
        generator = torch.Generator().manual_seed(expect_int("seed", seed, 0))
    params = list(model.parameters() if params is None else params)
    if not params:
        raise GauntletError("nothing to train: no parameters were given")
    optimiser = torch.optim.Adam(params, lr=lr)
    loss = loss or F.cross_entropy
    device = next(model.parameters()).device
    last = torch.tensor(0.0)
    for epoch in range(epochs):
        # Drawn on the generator's own device, indices moved: a seed gives the same
        # shuffles wherever the data lives.
        order = torch.randperm(len(x), generator=generator, device=generator.device)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx.to(x.device)].to(device), y[idx.to(y.device)].to(device)
            if perturb is not None:
                model.eval()  # craft against inference-mode statistics
                xb = perturb(model, xb, yb).detach()
            model.train(train_mode)
            last = loss(model(xb), yb)
            optimiser.zero_grad()
            last.backward()
            optimiser.step()
        if progress:
            progress(epoch + 1, epochs)
    model.eval()
    return float(last.detach())


class _EveryStep(torch.nn.Module):
    """The model as an attack sees it, told to run all of its steps on every example.

    The attacks stop on an example as soon as it is misclassified: the cheapest way to
    measure robustness. Training wants the full-strength example instead (Madry et al.
    train on the PGD iterate after all its steps), and ``stop_early`` is the switch the
    attacks read for that.
    """

    stop_early = False

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def adversarial(
    attack: Attack,
    eps: float,
    generator: torch.Generator,
    static: Sequence[torch.nn.Module] = (),
    counts: list[int] | None = None,
) -> Perturb:
    """``perturb`` for ``fit``: ``attack``'s L-inf examples at ``eps`` for each batch.

    With ``static`` models (ensemble adversarial training, Tramer et al. 2018) each
    batch's examples come from the model being trained or one of them, at random:
    decoupling the examples from the model is what stops single-step training from
    learning to mask its own gradients. Random starts and picks draw from ``generator``.
    ``counts`` (one entry per source: the model, then each static one) is incremented
    for each batch crafted on that source, so that a caller can show the static models
    were used rather than take it on trust.
    """
    threat = Threat("linf", eps)

    def perturb(model, xb, yb):
        source, index = model, 0
        if static:
            sources = [model, *static]
            pick = torch.randint(len(sources), (1,), generator=generator, device=generator.device)
            index = int(pick)
            source = sources[index]
        if counts is not None:
            counts[index] += 1
        # ``run``, not ``__call__``: every example is perturbed, misclassified ones too,
        # as in adversarial training; ``__call__`` would leave those clean.
        return attack.run(_EveryStep(source), xb, yb, threat, generator).x_adv

    return perturb


def soft_labels(
    teacher: torch.nn.Module, x: torch.Tensor, temperature: float, batch_size: int = 256
) -> torch.Tensor:
    """softmax(teacher logits / T) for each image, the teacher in eval mode."""
    teacher.eval()
    return predict_in_batches(
        teacher, x, batch_size, output=lambda out: F.softmax(out / temperature, dim=1)
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """``scale`` * cross-entropy of softmax(student_logits / T) against the soft labels.

    The soft-label loss of defensive distillation (Papernot et al. 2016, ``scale=1``).
    It differs from KL(teacher || student) only by the teacher's entropy, a constant, so
    the gradients are those of Hinton et al. 2015's KL loss; Hinton's ``scale=T**2``
    keeps their size as T changes.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return -(teacher_probs * log_student).sum(1).mean() * scale


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    arch: str,
    spec: InputSpec,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    adversarial_eps: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> torch.nn.Module:
    """Train a fresh ``arch`` on (x, y) with Adam; with FGSM-RS adversarial training when
    ``adversarial_eps > 0``.

    Returns the bare network (no normalisation wrapper), ready for ``save_classifier``.
    """
    model = fresh_model(arch, spec, seed)
    generator = torch.Generator().manual_seed(seed)
    perturb = None
    if adversarial_eps > 0:
        perturb = adversarial(FGSM_RANDOM_START, adversarial_eps, generator)
    schedule = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "progress": progress}
    fit(model, x, y, generator=generator, perturb=perturb, **schedule)
    return model.net
