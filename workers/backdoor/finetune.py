"""The baseline defense: fine-tune the whole model on a small clean split.

BackdoorBench (Wu et al. 2022, arXiv 2206.12654) reports it as "FT": with 5% of the
training data, clean and correctly labelled, the defender retrains every layer. Clean
data gives the trigger features no reason to keep driving the target logit, so the
backdoor weakens; how much depends on the learning rate and the epochs. The defaults
(Adam, lr 1e-2, 20 epochs, batches of 32) are what removed a BadNets square from a
small-cnn on digits: with lr 1e-3 most of the backdoor survived (ASR 0.8-0.95), with
1e-2 it fell to 0.01-0.14 for a loss of 3-8 points of clean accuracy.
``workers.backdoor.data.clean_subset`` draws the split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gauntlet.workers.backdoor._checks import expect_images, expect_labels, expect_model
from gauntlet.workers.backdoor.training import frozen, trainable_copy
from gauntlet.workers.models import Normalized
from gauntlet.workers.training import Schedule, fit

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULTS = Schedule(epochs=20, lr=1e-2, batch_size=32, seed=0)


def fine_tune(
    model: Normalized, x: torch.Tensor, y: torch.Tensor, **schedule: Unpack[Schedule]
) -> Normalized:
    """A copy of ``model`` with every layer trained on the clean (x, y); eval mode, frozen.

    ``schedule`` (epochs, lr, batch_size, seed, progress) goes to ``fit``; by default 20
    epochs at lr 1e-2, batches of 32, seed 0 (``DEFAULTS``, from the module docstring).
    """
    tuned = trainable_copy(expect_model("model", model))
    expect_labels("y", y, len(expect_images("x", x)), tuned.spec.num_classes)
    fit(tuned, x, y, **(DEFAULTS | schedule))
    return frozen(tuned)
