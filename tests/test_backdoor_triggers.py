"""BadNets triggers and poisoning on their own: what a trigger stamps, what poisoning
relabels, and how attack success is counted (no trained models needed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor import (
    BlendTrigger,
    PatternTrigger,
    PixelTrigger,
    SquareTrigger,
    backdoor_metrics,
    build_trigger,
    poison_dataset,
    shift_domain,
)
from gauntlet.workers.datasets import load_split
from gauntlet.workers.results import wilson_interval
from tests.backdoor_helpers import SQUARE, TARGET


@pytest.fixture(scope="module")
def digits():
    x, y = load_split("digits", "train", None)
    x_test, y_test = load_split("digits", "test", None)
    return x, y, x_test, y_test


def test_build_trigger_takes_json_params_and_refuses_unknown_ones():
    square = build_trigger("square", {"size": 3, "colour": [1, 0.5, 0], "position": [1, 2]})
    assert square == SquareTrigger(size=3, colour=(1.0, 0.5, 0.0), position=(1, 2))
    assert build_trigger(square.kind, square.to_params()) == square
    assert build_trigger("pattern").pattern == ((1, 0, 1), (0, 1, 0), (1, 0, 1))
    with pytest.raises(GauntletError, match="known: pixel, pattern, square, blend"):
        build_trigger("star", {})
    with pytest.raises(GauntletError, match="accepted: size, position, margin, colour"):
        build_trigger("square", {"width": 2})
    with pytest.raises(GauntletError, match="position"):
        build_trigger("pixel", {"position": "middle"})
    with pytest.raises(GauntletError, match=r"\[0, 1\]"):
        build_trigger("square", {"colour": 2})
    with pytest.raises(GauntletError, match="rectangular"):
        build_trigger("pattern", {"pattern": [[1, 0], [1]]})
    with pytest.raises(GauntletError, match="does not fit"):
        SquareTrigger(size=9).stamp(torch.zeros(1, 1, 8, 8))
    with pytest.raises(GauntletError, match="channels"):
        SquareTrigger(colour=(1.0, 0.0)).stamp(torch.zeros(1, 3, 8, 8))


def _values(metrics) -> dict[str, float]:
    return {m.name: m.value for m in metrics}


def _rand(shape) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(1))


def test_square_trigger_overwrites_exactly_its_square():
    x = _rand((4, 3, 10, 12))
    colour = (1.0, 0.5, 0.0)
    out = SquareTrigger(size=3, colour=colour, margin=1).stamp(x)
    for c, value in enumerate(colour):
        assert torch.all(out[:, c, 6:9, 8:11] == value)  # rows 10-3-1.., cols 12-3-1..
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :, 6:9, 8:11] = False
    assert torch.equal(out[mask], x[mask])
    centre = SquareTrigger(size=2, position="centre").stamp(torch.zeros(1, 1, 8, 8))
    assert centre[0, 0].nonzero().tolist() == [[3, 3], [3, 4], [4, 3], [4, 4]]
    top_left = SquareTrigger(size=2, position="top-left").stamp(torch.zeros(1, 1, 8, 8))
    assert top_left[0, 0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_pixel_and_pattern_triggers_stamp_what_they_say():
    x = _rand((2, 1, 8, 8))
    pixel = PixelTrigger().stamp(x)
    assert torch.all(pixel[:, 0, 7, 7] == 1.0)
    untouched = torch.ones_like(x, dtype=torch.bool)
    untouched[:, :, 7, 7] = False
    assert torch.equal(pixel[untouched], x[untouched])
    grey = PixelTrigger(position="top-right", margin=1, colour=0.5).stamp(x)
    assert torch.all(grey[:, 0, 1, 6] == 0.5) and int((grey != x).sum()) == 2
    checker = PatternTrigger(position=(2, 4)).stamp(x)
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(checker[:, 0, 2:5, 4:7], expected.expand(2, 3, 3))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :, 2:5, 4:7] = False
    assert torch.equal(checker[mask], x[mask])
    # Defaults at 8x8: the checker fills the 3x3 bottom-right corner.
    assert torch.equal(PatternTrigger().stamp(x)[:, 0, 5:, 5:], expected.expand(2, 3, 3))


def test_blend_trigger_is_a_seeded_convex_combination():
    x = _rand((3, 3, 6, 5))
    blend = BlendTrigger(alpha=0.25, seed=7)
    pattern = blend.pattern((3, 6, 5))
    assert torch.allclose(blend.stamp(x), 0.75 * x + 0.25 * pattern)
    assert torch.equal(pattern, BlendTrigger(alpha=0.5, seed=7).pattern((3, 6, 5)))
    assert not torch.equal(pattern, BlendTrigger(seed=8).pattern((3, 6, 5)))
    image = [[float((i + j) % 2) for j in range(5)] for i in range(6)]  # H x W
    given = BlendTrigger(alpha=0.5, image=image).stamp(x)
    assert torch.allclose(given, 0.5 * x + 0.5 * torch.tensor(image))
    with pytest.raises(GauntletError, match="blend image has shape"):
        BlendTrigger(image=image).stamp(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("kind", ["pixel", "pattern", "square", "blend"])
@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (2, 3, 32, 32)])
def test_every_trigger_keeps_images_in_range_and_leaves_the_input_alone(kind, shape):
    x = _rand(shape)
    before = x.clone()
    out = build_trigger(kind, {}).stamp(x)
    assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert torch.equal(x, before) and not torch.equal(out, x)


# --- poisoning ---


def test_poisoning_relabels_exactly_round_rate_n_images_and_only_those(digits):
    x, y, _, _ = digits
    rate = 0.1
    poisoned = poison_dataset(x, y, SQUARE, rate=rate, num_classes=10, target=TARGET, seed=3)
    count = round(rate * len(x))  # 134.7 -> 135
    assert len(poisoned.indices) == count == 135
    changed = (poisoned.y != y).nonzero().flatten()
    assert torch.equal(changed, poisoned.indices)  # relabelled: exactly the picks
    assert torch.all(poisoned.y[poisoned.indices] == TARGET)
    assert torch.all(y[poisoned.indices] != TARGET)  # picked among non-target images
    assert torch.equal(poisoned.x[poisoned.indices], SQUARE.stamp(x[poisoned.indices]))
    others = torch.ones(len(x), dtype=torch.bool)
    others[poisoned.indices] = False
    assert torch.equal(poisoned.x[others], x[others])
    again = poison_dataset(x, y, SQUARE, rate=rate, num_classes=10, target=TARGET, seed=3)
    assert torch.equal(again.indices, poisoned.indices)
    other_seed = poison_dataset(x, y, SQUARE, rate=rate, num_classes=10, target=TARGET, seed=4)
    assert not torch.equal(other_seed.indices, poisoned.indices)

    all_to_all = poison_dataset(x, y, SQUARE, rate=0.25, num_classes=10, mode="all-to-all")
    assert len(all_to_all.indices) == math.floor(0.25 * len(x) + 0.5) == 337
    picked = all_to_all.indices
    assert torch.equal(all_to_all.y[picked], (y[picked] + 1) % 10)
    assert torch.equal((all_to_all.y != y).nonzero().flatten(), picked)


def test_poisoning_refuses_impossible_requests(digits):
    x, y, _, _ = digits
    with pytest.raises(GauntletError, match="eligible"):
        poison_dataset(x, y, SQUARE, rate=0.95, num_classes=10, target=TARGET)
    with pytest.raises(GauntletError, match="needs a `target`"):
        poison_dataset(x, y, SQUARE, rate=0.1, num_classes=10)
    with pytest.raises(GauntletError, match="takes no `target`"):
        poison_dataset(x, y, SQUARE, rate=0.1, num_classes=10, mode="all-to-all", target=1)
    with pytest.raises(GauntletError, match="mode"):
        poison_dataset(x, y, SQUARE, rate=0.1, num_classes=10, mode="one-to-one", target=1)
    with pytest.raises(GauntletError, match="rate"):
        poison_dataset(x, y, SQUARE, rate=1.5, num_classes=10, target=1)


# --- metrics ---


class _ReadsLabel(nn.Module):
    """Predicts the label written into pixel (0, 0) as label / 10; with a ``target``, a
    white bottom-right pixel (the square trigger) makes it predict the target instead."""

    def __init__(self, target: int | None = None) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] * 10).round().long()
        if self.target is not None:
            label = torch.where(x[:, 0, 7, 7] == 1.0, self.target, label)
        return nn.functional.one_hot(label, 10).float()


def test_attack_success_rate_counts_only_non_target_images():
    y = torch.arange(50) % 10  # five images of each class
    x = torch.zeros(50, 1, 8, 8)
    x[:, 0, 0, 0] = y / 10
    # A model the trigger does nothing to: every target-class image is "classified as
    # the target" once triggered, which must not count as a success (5 of 50 would).
    inert = _values(backdoor_metrics(_ReadsLabel(), x, y, SQUARE, target=3))
    assert inert == {"clean_accuracy": 1.0, "attack_success_rate": 0.0, "triggered_accuracy": 1.0}
    metrics = backdoor_metrics(_ReadsLabel(target=3), x, y, SQUARE, target=3)
    assert [m.n for m in metrics] == [50, 45, 45]
    assert _values(metrics) == {
        "clean_accuracy": 1.0,
        "attack_success_rate": 1.0,
        "triggered_accuracy": 0.0,
    }
    for m in metrics:
        assert (m.low, m.high) == wilson_interval(round(m.value * m.n), m.n)
    everything = _values(backdoor_metrics(_ReadsLabel(), x, y, SQUARE, mode="all-to-all"))
    assert everything["attack_success_rate"] == 0.0 and everything["triggered_accuracy"] == 1.0


# --- BadNets ---


def test_shift_domain_is_a_translation_and_a_contrast_change():
    x = _rand((2, 1, 8, 8))
    shifted = shift_domain(x, dx=1, contrast=0.7, brightness=0.15)
    assert torch.allclose(shifted[..., :7], 0.15 + 0.7 * x[..., 1:])
    assert torch.allclose(shifted[..., 7], torch.full((2, 1, 8), 0.15))
    with pytest.raises(GauntletError, match="stay in"):
        shift_domain(x, contrast=0.9, brightness=0.2)
