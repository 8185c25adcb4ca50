"""How well a backdoor works, and how much of it a defense leaves.

Metric names (each a ``workers.results.Metric`` with its n and a 95% Wilson interval):

- ``clean_accuracy``: accuracy on the untouched test images (all of them);
- ``attack_success_rate``: the share of triggered images classified as the attacker
  wants. All-to-one: only test images whose true label is not the target count, since a
  target-class image classified as the target is a correct prediction, not a success
  (Gu et al. 2017; BackdoorBench). All-to-all: every image, success meaning the
  prediction is (y + 1) mod C;
- ``triggered_accuracy``: the share of those same triggered images still given their
  true label (BackdoorBench's "robust accuracy"; renamed here because robust accuracy
  means accuracy under adversarial attack everywhere else in this service).

For a target task whose classes have nothing to do with the attacker's target (the
label-split transfer of Gu et al. 2017, Section 5.3), ``trigger_drop_metrics`` gives
clean and triggered accuracy over all images and the drop between them, in points:
the paper's measure of how much of the backdoor survives transfer.
"""

from __future__ import annotations

import torch

from gauntlet.workers.backdoor._checks import expect_images, expect_int, expect_labels
from gauntlet.workers.backdoor.poison import backdoor_labels, check_mode
from gauntlet.workers.backdoor.triggers import Trigger, expect_trigger
from gauntlet.workers.batches import eval_mode, model_device, predict_in_batches
from gauntlet.workers.results import Metric, wilson_interval


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels (on x's device) of the pixel-space model, in eval mode, batched."""
    expect_int("batch_size", batch_size, 1)
    if len(x) == 0:  # an empty split (no test image outside the target class) scores 0/0
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    with eval_mode(model):
        # Labels only, per batch: the logits of a whole test split need not be kept.
        return predict_in_batches(
            model, x, batch_size, output=lambda out: out.argmax(1).to(x.device)
        )


def rate_metric(name: str, hits: torch.Tensor) -> Metric:
    """The share of True in a boolean vector, with n and its 95% Wilson interval."""
    k, n = int(hits.sum()), int(hits.numel())
    low, high = wilson_interval(k, n)
    return Metric(name, k / n if n else 0.0, n, low, high)


def backdoor_metrics(
    model: torch.nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    trigger: Trigger,
    target: int | None = None,
    mode: str = "all-to-one",
    batch_size: int = 256,
) -> list[Metric]:
    """clean_accuracy, attack_success_rate and triggered_accuracy (see the module docstring)."""
    trigger = expect_trigger("trigger", trigger)
    x_test = expect_images("x_test", x_test)
    clean = predict(model, x_test, batch_size)
    num_classes = _num_classes(model, x_test)
    y_test = expect_labels("y_test", y_test, len(x_test), num_classes)
    target = check_mode(mode, target, num_classes)
    # The attack is judged only where it asks for a label change (see the module docstring).
    attacked = y_test != target if target is not None else torch.ones_like(y_test, dtype=bool)
    x_att, y_att = x_test[attacked], y_test[attacked]
    triggered = predict(model, trigger.stamp(x_att), batch_size)
    wanted = backdoor_labels(y_att, mode, target, num_classes)
    return [
        rate_metric("clean_accuracy", clean == y_test),
        rate_metric("attack_success_rate", triggered == wanted),
        rate_metric("triggered_accuracy", triggered == y_att),
    ]


def trigger_drop_metrics(
    model: torch.nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    trigger: Trigger,
    batch_size: int = 256,
) -> list[Metric]:
    """clean_accuracy and triggered_accuracy over all images, and their difference.

    ``triggered_accuracy_drop`` is clean minus triggered accuracy, in [-1, 1] (a share,
    like the accuracies): how much the trigger still hurts a model whose classes no
    longer contain the attacker's target. It carries no interval (a difference of two
    paired rates has no Wilson interval).
    """
    trigger = expect_trigger("trigger", trigger)
    x_test = expect_images("x_test", x_test)
    y_test = expect_labels("y_test", y_test, len(x_test), _num_classes(model, x_test))
    clean = rate_metric("clean_accuracy", predict(model, x_test, batch_size) == y_test)
    hits = predict(model, trigger.stamp(x_test), batch_size) == y_test
    triggered = rate_metric("triggered_accuracy", hits)
    drop = Metric("triggered_accuracy_drop", clean.value - triggered.value, len(y_test))
    return [clean, triggered, drop]


@torch.no_grad()
def _num_classes(model: torch.nn.Module, x: torch.Tensor) -> int:
    spec = getattr(model, "spec", None)
    if spec is not None:
        return spec.num_classes
    # One direct call, not predict_in_batches: x may be empty, and a (0, C) answer
    # still says C.
    device = model_device(model)
    with eval_mode(model):
        return int(model(x[:1] if device is None else x[:1].to(device)).shape[1])
