"""BadNets backdoors and the defenses against them, on the offline digits dataset.

The backdoored and clean models are trained once per module (small-cnn, 10 epochs,
seed 0). Every threshold was checked by running this file with SEED set to 0-15 (the
seed of the whole pipeline: poison picks, initialisation, shuffles); the comment by
each assertion gives the observed range, and names the seeds where one did not hold.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor import (
    amplify_backdoor,
    backdoor_metrics,
    backdoor_neurons,
    clean_subset,
    distill,
    fine_tune,
    label_split,
    penultimate_features,
    shift_domain,
    train_backdoored,
    transfer_learn,
    trigger_drop_metrics,
)
from gauntlet.workers.datasets import load_split
from gauntlet.workers.models import InputSpec, Normalized
from tests.backdoor_helpers import SEED, SPEC, SQUARE, TARGET, TRAIN


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
    # workers.backdoor.transfer_learning.
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
