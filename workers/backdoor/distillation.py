"""Distillation-based forgetting of a backdoor (Yoshida & Fujino 2020).

"Disabling backdoor and identifying poison data by using knowledge distillation in
backdoor attacks on deep neural networks" (AISec 2020): a fresh student learns the
(possibly backdoored) teacher's softened outputs on pristine data, which the defender
holds, with no trigger in it. The student copies what the teacher does on those inputs,
the clean task, and never sees the trigger fire, so it has nothing to learn the
backdoor from. The loss is Hinton et al. 2015 ("Distilling the knowledge in a neural
network", arXiv 1503.02531): KL(softmax(teacher / T) || softmax(student / T)), times
T^2 so the gradients keep their size as T changes.

The caveat the literature gives is the reason for ``trigger_fraction``: when part of
the distillation inputs carry the trigger, the teacher labels them with the target and
the student learns the backdoor from it.

A second caveat, measured on digits: the softer the labels, the more of the backdoor
leaks through them even from pristine inputs. A backdoored teacher gives clean images
that merely resemble the trigger a little extra probability on the target, and a
student that fits those soft labels closely learns that association. Student ASR rose
with T (one model: 0.00 at T=1, 0.03 at 2, 0.07 at 4, 0.11 at 10; another: 0.05, 0.13,
0.25, 0.26) and with longer training, hence the default T = 1 and a short schedule
(10 epochs at lr 1e-3 gave 0.00-0.08 over seven seeds).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor._checks import (
    expect_float,
    expect_fraction,
    expect_images,
    expect_int,
    expect_model,
)
from gauntlet.workers.backdoor.training import DEFAULTS, frozen
from gauntlet.workers.backdoor.triggers import Trigger, expect_trigger
from gauntlet.workers.models import InputSpec, Normalized
from gauntlet.workers.training import Schedule, distillation_loss, fit, fresh_model, soft_labels

if TYPE_CHECKING:
    from typing_extensions import Unpack


def distill(
    teacher: Normalized,
    x: torch.Tensor,
    *,
    arch: str,
    spec: InputSpec | None = None,
    temperature: float = 1.0,
    trigger: Trigger | None = None,
    trigger_fraction: float = 0.0,
    **schedule: Unpack[Schedule],
) -> Normalized:
    """A fresh ``arch`` student trained on the teacher's soft labels of ``x`` at ``T``.

    ``x`` are the distillation inputs (no labels needed: the teacher gives them). With a
    ``trigger``, ``round(trigger_fraction * len(x))`` seeded picks of them are stamped
    first (labels still from the teacher): the variant where the backdoor transfers.
    ``spec`` defaults to the teacher's. ``schedule`` (epochs, lr, batch_size, seed,
    progress) goes to ``fit``; by default 10 epochs at lr 1e-3, batches of 64, seed 0
    (``training.DEFAULTS``). The seed also fixes the picks and the student's
    initialisation. Returns the student (eval mode, frozen).
    """
    teacher = expect_model("teacher", teacher)
    x = expect_images("x", x)
    temperature = expect_float("temperature", temperature, 0.0, 1e4)
    fraction = expect_fraction("trigger_fraction", trigger_fraction)
    schedule = DEFAULTS | schedule
    seed = expect_int("seed", schedule["seed"], 0)
    spec = spec or teacher.spec
    if spec.num_classes != teacher.spec.num_classes:
        raise GauntletError(
            f"the student must have the teacher's {teacher.spec.num_classes} classes, "
            f"but its spec has {spec.num_classes}"
        )
    if fraction > 0:
        trigger = expect_trigger("trigger", trigger)  # stamping needs a trigger
        count = math.floor(fraction * len(x) + 0.5)
        picked = np.random.default_rng(seed).choice(len(x), size=count, replace=False)
        index = torch.from_numpy(np.sort(picked).astype(np.int64)).to(x.device)
        x = x.clone()
        x[index] = trigger.stamp(x[index])
    targets = soft_labels(teacher, x, temperature).to(x.device)
    student = fresh_model(arch, spec, seed, teacher.mean.device)

    # The soft labels stand in for y: fit shuffles and batches them alongside x.
    fit(
        student,
        x,
        targets,
        loss=lambda logits, probs: distillation_loss(
            logits, probs, temperature, scale=temperature**2
        ),
        **schedule,
    )
    return frozen(student)
