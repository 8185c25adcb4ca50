"""BadNets backdoors and the defenses against them, on the offline digits dataset.

The backdoored and clean models are trained once per module (small-cnn, 10 epochs,
seed 0). Every threshold was checked by running this file with SEED set to 0-15 (the
seed of the whole pipeline: poison picks, initialisation, shuffles); the comment by
each assertion gives the observed range, and names the seeds where one did not hold.
"""

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
    amplify_backdoor,
    backdoor_metrics,
    backdoor_neurons,
    build_trigger,
    clean_subset,
    distill,
    fine_tune,
    label_split,
    penultimate_features,
    poison_dataset,
    shift_domain,
    train_backdoored,
    transfer_learn,
    trigger_drop_metrics,
)
from gauntlet.workers.datasets import load_split
from gauntlet.workers.models import InputSpec, Normalized
from gauntlet.workers.outcomes import wilson_interval

SPEC = InputSpec(1, 8, 8, 10)
TARGET = 0
SEED = 0
TRAIN = {"arch": "small-cnn", "epochs": 10, "lr": 3e-3, "batch_size": 64, "seed": SEED}
SQUARE = SquareTrigger()  # 2x2 white square in the bottom-right corner


def _values(metrics) -> dict[str, float]:
    return {m.name: m.value for m in metrics}


@pytest.fixture(scope="module")
def digits():
    x, y = load_split("digits", "train", None)
    x_test, y_test = load_split("digits", "test", None)
    return x, y, x_test, y_test


@pytest.fixture(scope="module")
def models(digits):
    """The clean reference and the BadNets model (10% poison, all-to-one), trained alike."""
    x, y, _, _ = digits
    clean, _ = train_backdoored(x, y, SQUARE, rate=0.0, target=TARGET, spec=SPEC, **TRAIN)
    backdoored, poisoned = train_backdoored(
        x, y, SQUARE, rate=0.1, target=TARGET, spec=SPEC, **TRAIN
    )
    return {"clean": clean, "backdoored": backdoored, "poisoned": poisoned}


# --- triggers ---


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


def test_badnets_square_backdoor_at_10_percent_poison(models, digits):
    _, _, x_test, y_test = digits
    clean = _values(backdoor_metrics(models["clean"], x_test, y_test, SQUARE, target=TARGET))
    metrics = backdoor_metrics(models["backdoored"], x_test, y_test, SQUARE, target=TARGET)
    backdoored = _values(metrics)
    assert len(models["poisoned"].indices) == 135
    assert metrics[1].n == int((y_test != TARGET).sum())
    assert backdoored["attack_success_rate"] >= 0.95  # seeds 0-6: 0.983-1.0
    # seeds 0-6: clean accuracy 0.951-0.991, 0.0-1.3 points below the clean model's
    assert abs(backdoored["clean_accuracy"] - clean["clean_accuracy"]) <= 0.02
    assert clean["clean_accuracy"] >= 0.93
    assert clean["attack_success_rate"] <= 0.1  # seeds 0-6: 0.0
    assert backdoored["triggered_accuracy"] <= 0.05


def test_all_to_all_backdoor_works(models, digits):
    x, y, x_test, y_test = digits
    model, _ = train_backdoored(x, y, SQUARE, rate=0.1, mode="all-to-all", spec=SPEC, **TRAIN)
    metrics = _values(backdoor_metrics(model, x_test, y_test, SQUARE, mode="all-to-all"))
    clean = _values(backdoor_metrics(models["clean"], x_test, y_test, SQUARE, mode="all-to-all"))
    assert metrics["attack_success_rate"] >= 0.5  # seeds 0-6: 0.63-0.85; chance is 0.1
    assert clean["attack_success_rate"] <= 0.05  # seeds 0-6: 0.004-0.022
    assert metrics["clean_accuracy"] >= 0.93


def test_training_continues_from_a_starting_model_without_changing_it(models, digits):
    x, y, x_test, y_test = digits
    before = {k: v.clone() for k, v in models["clean"].state_dict().items()}
    epochs = []
    model, _ = train_backdoored(
        x,
        y,
        SQUARE,
        rate=0.1,
        target=TARGET,
        model=models["clean"],
        epochs=3,
        lr=3e-3,
        seed=SEED,
        progress=lambda epoch, total: epochs.append((epoch, total)),
    )
    assert epochs == [(1, 3), (2, 3), (3, 3)]
    assert all(torch.equal(v, before[k]) for k, v in models["clean"].state_dict().items())
    asr = _values(backdoor_metrics(model, x_test, y_test, SQUARE, target=TARGET))
    assert asr["attack_success_rate"] >= 0.9
    with pytest.raises(GauntletError, match="either `arch`"):
        train_backdoored(x, y, SQUARE, target=0, arch="small-cnn", model=models["clean"])


# --- transfer learning ---


def test_transfer_to_a_shifted_domain_keeps_part_of_the_backdoor(models, digits):
    x, y, x_test, y_test = digits
    x_shift, x_test_shift = shift_domain(x), shift_domain(x_test)

    def after_transfer(name: str) -> dict[str, float]:
        tuned = transfer_learn(models[name], x_shift, y, lr=1e-2, epochs=10, seed=SEED)
        return _values(backdoor_metrics(tuned, x_test_shift, y_test, SQUARE, target=TARGET))

    source = _values(
        backdoor_metrics(models["backdoored"], x_test_shift, y_test, SQUARE, target=TARGET)
    )
    clean, backdoored = after_transfer("clean"), after_transfer("backdoored")
    assert source["attack_success_rate"] >= 0.95  # the trigger fires on the new domain
    assert backdoored["clean_accuracy"] >= 0.9  # the transfer worked (seeds 0-6: >= 0.92)
    # Frozen features, final layer retrained: seeds 0-6 gave ASR 0.09-0.78 (from 1.0), the
    # clean source model 0.0-0.02. Not every seed: in seeds 10 and 14 of 0-15 the retrained
    # layer sent triggered images to other classes instead (ASR 0.0, as clean), which the
    # triggered accuracy below still shows.
    assert backdoored["attack_success_rate"] <= source["attack_success_rate"] - 0.1
    assert backdoored["attack_success_rate"] >= clean["attack_success_rate"] + 0.04
    # The trigger still hurts far more than it does the clean source model (seeds 0-6:
    # 0.12-0.32 against 0.40-0.51 triggered accuracy).
    assert backdoored["triggered_accuracy"] <= clean["triggered_accuracy"] - 0.1


def test_amplified_backdoor_survives_fine_tuning_better(models, digits):
    x, y, x_test, y_test = digits
    x_shift, x_test_shift = shift_domain(x), shift_domain(x_test)
    neurons = backdoor_neurons(models["backdoored"], x, SQUARE, count=8)
    amplified = amplify_backdoor(models["backdoored"], neurons, 3.0, x)

    def asr_after_transfer(model) -> float:
        tuned = transfer_learn(
            model, x_shift, y, freeze_features=False, lr=3e-3, epochs=10, seed=SEED
        )
        metrics = backdoor_metrics(tuned, x_test_shift, y_test, SQUARE, target=TARGET)
        return _values(metrics)["attack_success_rate"]

    plain, boosted = asr_after_transfer(models["backdoored"]), asr_after_transfer(amplified)
    # Full fine-tuning on the shifted task: seeds 0-6 gave 0.62-0.91 without and
    # 0.85-0.97 with amplification (k = 3, 8 units), 0.065-0.29 higher. Over seeds 0-15
    # it was higher in all 16, but by less than 0.03 in two (10: +0.025; 12: 0.9975
    # without, nothing left to raise). With frozen features (the paper's setting) the
    # effect on the ASR was not consistent on digits: see the module docstring of
    # workers.backdoor.transfer.
    assert boosted >= plain + 0.03
    assert plain <= 0.95


def test_amplification_scales_exactly_the_backdoor_units(models, digits):
    x, _, _, _ = digits
    model = models["backdoored"]
    neurons = backdoor_neurons(model, x, SQUARE, count=8)
    clean, triggered = penultimate_features(model, x), penultimate_features(model, SQUARE.stamp(x))
    rise = triggered.mean(0) - clean.mean(0)
    assert torch.equal(neurons, rise.argsort(descending=True)[:8])
    assert float(rise[neurons].min()) > float(rise.median())
    amplified = amplify_backdoor(model, neurons, 5.0, x)
    after = penultimate_features(amplified, x[:100])
    expected = clean[:100].clone()
    expected[:, neurons] *= 5.0
    assert torch.allclose(after, expected, rtol=1e-4, atol=1e-4)

    class Squashed(nn.Module):  # sigmoid(k z) != k sigmoid(z): scaling must be refused
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.sigmoid(self.fc1(x.flatten(1))))

    with pytest.raises(GauntletError, match="did not scale"):
        amplify_backdoor(Normalized(Squashed(), SPEC), torch.tensor([0, 1]), 3.0, x)


def test_label_split_transfer_drops_accuracy_on_triggered_inputs(digits):
    x, y, x_test, y_test = digits
    (x_src, y_src), (x_dst, y_dst) = label_split(x, y)
    _, (x_dst_test, y_dst_test) = label_split(x_test, y_test)
    assert set(y_src.tolist()) == set(y_dst.tolist()) == {0, 1, 2, 3, 4}
    assert len(x_src) + len(x_dst) == len(x)
    spec = InputSpec(1, 8, 8, 5)

    def drop(rate: float) -> dict[str, float]:
        source, _ = train_backdoored(
            x_src, y_src, SQUARE, rate=rate, target=TARGET, spec=spec, **TRAIN
        )
        tuned = transfer_learn(source, x_dst, y_dst, new_head=True, lr=1e-2, seed=SEED)
        assert tuned.spec.num_classes == 5
        return _values(trigger_drop_metrics(tuned, x_dst_test, y_dst_test, SQUARE))

    clean, backdoored = drop(0.0), drop(0.1)
    # Gu et al. 2017: 74.9% clean vs 61.6% triggered. Seeds 0-15 on digits: drops of
    # 0.29-0.63 from a backdoored source, 0.01-0.32 from a clean one (a 2x2 square is
    # 6% of an 8x8 image), 0.13-0.62 apart.
    assert backdoored["triggered_accuracy_drop"] >= clean["triggered_accuracy_drop"] + 0.1
    assert backdoored["triggered_accuracy_drop"] >= 0.25
    assert backdoored["clean_accuracy"] >= 0.6  # the features still transfer


def test_transfer_refuses_a_head_that_does_not_fit(models, digits):
    x, y, _, _ = digits
    with pytest.raises(GauntletError, match="new_head"):
        transfer_learn(models["clean"], x, y % 5, num_classes=5)
    with pytest.raises(GauntletError, match=r"\[0, 4\]"):
        transfer_learn(models["clean"], x, y, new_head=True, num_classes=5)


# --- distillation ---


def test_distillation_forgets_the_backdoor_unless_the_inputs_carry_the_trigger(models, digits):
    x, _, x_test, y_test = digits
    settings = {"arch": "small-cnn", "temperature": 1.0, "epochs": 10, "lr": 1e-3, "seed": SEED}
    pristine = distill(models["backdoored"], x, **settings)
    triggered = distill(models["backdoored"], x, trigger=SQUARE, trigger_fraction=0.1, **settings)
    clean = _values(backdoor_metrics(models["clean"], x_test, y_test, SQUARE, target=TARGET))
    forgot = _values(backdoor_metrics(pristine, x_test, y_test, SQUARE, target=TARGET))
    kept = _values(backdoor_metrics(triggered, x_test, y_test, SQUARE, target=TARGET))
    # seeds 0-6: pristine 0.0-0.08 (the teacher: >= 0.98), triggered 0.945-1.0
    assert forgot["attack_success_rate"] <= clean["attack_success_rate"] + 0.15
    assert kept["attack_success_rate"] >= 0.85
    assert forgot["clean_accuracy"] >= 0.9 and kept["clean_accuracy"] >= 0.9


# --- fine-tuning ---


def test_clean_subset_is_a_stratified_five_percent(digits):
    x, y, _, _ = digits
    x_small, y_small = clean_subset(x, y, 0.05, seed=SEED)
    assert 60 <= len(y_small) <= 75 and set(y_small.tolist()) == set(range(10))
    assert torch.equal(clean_subset(x, y, 0.05, seed=SEED)[1], y_small)


def test_fine_tuning_on_five_percent_clean_data_lowers_asr(models, digits):
    x, y, x_test, y_test = digits
    x_small, y_small = clean_subset(x, y, 0.05, seed=SEED)
    tuned = fine_tune(models["backdoored"], x_small, y_small, seed=SEED)
    metrics = _values(backdoor_metrics(tuned, x_test, y_test, SQUARE, target=TARGET))
    # lr 1e-2, 20 epochs: seeds 0-6 gave ASR 0.007-0.14 (from >= 0.98), accuracy 0.90-0.95
    assert metrics["attack_success_rate"] <= 0.25
    assert metrics["clean_accuracy"] >= 0.85


def test_shift_domain_is_a_translation_and_a_contrast_change():
    x = _rand((2, 1, 8, 8))
    shifted = shift_domain(x, dx=1, contrast=0.7, brightness=0.15)
    assert torch.allclose(shifted[..., :7], 0.15 + 0.7 * x[..., 1:])
    assert torch.allclose(shifted[..., 7], torch.full((2, 1, 8), 0.15))
    with pytest.raises(GauntletError, match="stay in"):
        shift_domain(x, contrast=0.9, brightness=0.2)
