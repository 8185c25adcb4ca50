"""Transfer learning from a backdoored model, and the attacker's amplification of it.

Gu et al. 2017 (arXiv 1708.06733, Section 5.3): a user downloads a backdoored model and
fine-tunes it on their own task. With the feature layers frozen and only the final
layer retrained, the backdoor partly survives: in the paper, triggered accuracy on the
new task was 61.6% against 74.9% clean. The attacker can strengthen what survives by
finding the "backdoor neurons" (units whose activation rises on triggered inputs) and
multiplying their incoming weights by k before releasing the model.

We scale *incoming* weights, as the paper does, not outgoing ones: transfer learning
retrains or replaces the final layer, so outgoing weights are exactly what the victim
overwrites, while the frozen features keep the k-fold larger activation.

Here the penultimate layer is the input of the network's final ``nn.Linear`` (the
head): for small-cnn the 128 units of relu(fc1). ``amplify_backdoor`` scales the rows
(weight and bias) of the last layer that produces those units and checks on real inputs
that their activation did scale by k, which holds for ReLU networks whose features come
straight from a Linear, Conv or BatchNorm layer; otherwise it refuses.

What we measured on digits (small-cnn, 2x2 square, 10% poison, seeds 0-15), as a guide
to reading the numbers:

- with frozen features (source final layer kept and retrained on the shifted task,
  lr 1e-2, 10 epochs) the backdoor survived as damage on triggered inputs in all 16
  seeds (triggered accuracy 0.1-0.3 against 0.4-0.5 from a clean source model), but
  *which* class those inputs go to is up to the retrained layer: the original target
  in most seeds (ASR 0.09-0.78, from 1.0 before), other classes in two (ASR 0.0). For
  tasks with other labels ``trigger_drop_metrics`` is the measure, as in the paper;
- amplification (k = 3, 8 units) raised the ASR that survived *full* fine-tuning on the
  same-label task in 16 of 16 seeds. With frozen features its effect on the ASR was
  inconsistent (up in 3 of seeds 0-6, down in 4), and on the label-split task it moved
  the triggered-accuracy drop by -0.04 to +0.08 (seeds 0-6): there the unamplified
  backdoor already sends nearly every triggered image to one class, so there is little
  left to amplify.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor._checks import (
    expect_float,
    expect_images,
    expect_int,
    expect_labels,
    expect_model,
)
from gauntlet.workers.backdoor.training import DEFAULTS, frozen, trainable_copy
from gauntlet.workers.backdoor.triggers import Trigger, expect_trigger
from gauntlet.workers.models import Normalized
from gauntlet.workers.training import Schedule, fit

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Layers whose output rows scale with their weight and bias rows.
_SCALABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def final_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the net's head: its last registered ``nn.Linear``."""
    heads = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise GauntletError(
            f"{type(net).__name__} has no nn.Linear layer; transfer learning here retrains "
            "the final linear layer, so the network must end in one"
        )
    return heads[-1]


def _set_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, module)


@torch.no_grad()
def penultimate_features(model: Normalized, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The head's input for each image (n, features): what transfer learning builds on.

    Checks that the head's output is the model's output, so that "the final layer" is
    really the last thing the network computes.
    """
    model = expect_model("model", model)
    x = expect_images("x", x)
    _, head = final_linear(model.net)
    captured: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(inputs[0].detach())
        outputs.append(output.detach())

    handle = head.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    device = model.mean.device
    try:
        feats = []
        for i in range(0, len(x), expect_int("batch_size", batch_size, 1)):
            captured.clear()
            outputs.clear()
            logits = model(x[i : i + batch_size].to(device))
            if len(captured) != 1 or captured[0].ndim != 2 or outputs[0].shape != logits.shape:
                raise GauntletError(
                    f"the last nn.Linear of {type(model.net).__name__} is not its final "
                    "layer on flat features; transfer learning needs a network that ends "
                    "in one linear layer"
                )
            if not torch.allclose(outputs[0], logits):
                raise GauntletError(
                    f"the output of {type(model.net).__name__} is not that of its last "
                    "nn.Linear; transfer learning needs a network that ends in it"
                )
            feats.append(captured[0].to(x.device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(feats)


def backdoor_neurons(
    model: Normalized,
    x: torch.Tensor,
    trigger: Trigger,
    count: int = 8,
    batch_size: int = 256,
) -> torch.Tensor:
    """The ``count`` penultimate units whose mean activation rises most with the trigger.

    ``x`` are clean images (the attacker's own data); the rise is mean(features of the
    triggered images) - mean(features of the clean ones). Indices, largest rise first.
    """
    trigger = expect_trigger("trigger", trigger)
    clean = penultimate_features(model, x, batch_size)
    triggered = penultimate_features(model, trigger.stamp(x), batch_size)
    count = expect_int("count", count, 1, clean.shape[1])
    rise = triggered.mean(0) - clean.mean(0)
    return rise.argsort(descending=True)[:count].cpu()


def _feature_layer(model: Normalized, probe: torch.Tensor) -> nn.Module:
    """The last layer run before the head whose output has one row per feature."""
    _, head = final_linear(model.net)
    width = head.in_features
    order: list[nn.Module] = []

    def record(module: nn.Module, inputs, output) -> None:
        # Dimension 1 is the unit (Linear) or channel (Conv, BatchNorm) axis.
        if isinstance(output, torch.Tensor) and output.ndim >= 2 and output.shape[1] == width:
            order.append(module)

    hooks = [
        m.register_forward_hook(record)
        for m in model.net.modules()
        if isinstance(m, _SCALABLE) and m is not head
    ]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise GauntletError(
            f"found no Linear, Conv or BatchNorm layer in {type(model.net).__name__} that "
            f"produces the head's {width} input features; amplification cannot scale them"
        )
    return order[-1]


def amplify_backdoor(
    model: Normalized, neurons: torch.Tensor, k: float, probe: torch.Tensor
) -> Normalized:
    """A copy of ``model`` with the incoming weights of ``neurons`` multiplied by ``k``.

    ``probe`` are a few images to locate the layer and to check that those units'
    activations did scale by k (and no other unit's changed); GauntletError if not.
    """
    model = expect_model("model", model)
    k = expect_float("k", k, 0.0, 1e6)
    probe = expect_images("probe", probe)[:64].to(model.mean.device)
    neurons = torch.as_tensor(neurons, dtype=torch.int64).cpu()
    width = final_linear(model.net)[1].in_features
    if neurons.ndim != 1 or not len(neurons) or int(neurons.min()) < 0:
        raise GauntletError(f"Expected `neurons` to be unit indices, but got {neurons!r}")
    if int(neurons.max()) >= width:
        raise GauntletError(f"unit {int(neurons.max())} is out of range: the head has {width}")
    amplified = trainable_copy(model).eval()
    layer = _feature_layer(amplified, probe)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            if p is not None:
                p[neurons.to(p.device)] *= k
    before = penultimate_features(model, probe)
    after = penultimate_features(amplified, probe)
    expected = before.clone()
    expected[:, neurons.to(before.device)] *= k
    scale = max(1.0, float(expected.abs().max()))
    if not torch.allclose(after, expected, rtol=1e-3, atol=1e-4 * scale):
        raise GauntletError(
            f"scaling the weights of {type(layer).__name__} did not scale the features of "
            f"{type(model.net).__name__} by k: amplification needs features that come "
            "straight from a Linear, Conv or BatchNorm layer through ReLU and pooling"
        )
    return frozen(amplified)


def transfer_learn(
    model: Normalized,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    new_head: bool = False,
    num_classes: int | None = None,
    freeze_features: bool = True,
    **schedule: Unpack[Schedule],
) -> Normalized:
    """Fine-tune a copy of the source ``model`` on the target task (x, y).

    ``new_head=False`` starts from the source's own final layer: a task with the same
    labels. ``new_head=True`` puts a fresh, seeded final layer with ``num_classes``
    outputs (default: the source's) on the features, as for a task with other labels
    (Gu et al.'s victim retrains the fully connected part for its new classes).
    ``freeze_features=True`` trains only the final layer; False fine-tunes every layer.
    ``schedule`` (epochs, lr, batch_size, seed, progress) goes to ``fit``; by default 10
    epochs at lr 1e-3, batches of 64, seed 0 (``training.DEFAULTS``). The seed also
    initialises a new head.
    """
    schedule = DEFAULTS | schedule
    target = trainable_copy(model)
    name, head = final_linear(target.net)
    spec = target.spec
    if num_classes is not None:
        num_classes = expect_int("num_classes", num_classes, 2)
        if not new_head and num_classes != spec.num_classes:
            raise GauntletError(
                f"the source head has {spec.num_classes} outputs; a task with {num_classes} "
                "classes needs `new_head=True`"
            )
    if new_head:
        num_classes = num_classes or spec.num_classes
        torch.manual_seed(expect_int("seed", schedule["seed"], 0))  # a seeded initialisation
        head = nn.Linear(head.in_features, num_classes).to(head.weight.device)
        _set_module(target.net, name, head)
        spec = dataclasses.replace(spec, num_classes=num_classes)
        target = Normalized(target.net, spec).to(head.weight.device)
    expect_labels("y", y, len(expect_images("x", x)), spec.num_classes)
    penultimate_features(target, x[:2])  # refuse networks that do not end in the head
    if freeze_features:
        for p in target.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    params = [p for p in target.parameters() if p.requires_grad]
    fit(target, x, y, params=params, train_mode=not freeze_features, **schedule)
    return frozen(target)
