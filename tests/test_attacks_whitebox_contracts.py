"""White-box attack contracts: targets, the threat ball, active sets, reprs, validation.

The iterative, DeepFool and Carlini-Wagner attacks on the standard digits CNN. Point
counts and step counts are small: the whole file is CPU-bound.
"""

from __future__ import annotations

import pytest
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import ATTACKS, Threat, build_attack, validate_attack
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.targets import TARGET_MODES, choose_targets
from tests.attack_helpers import (
    CW_FAST,
    NEW,
    accuracy,
    seeded,
)

# --- targets -------------------------------------------------------------------------


def test_target_helper():
    gen = seeded(0)
    logits = torch.randn(500, 10, generator=gen)
    y = logits.argmax(1)
    for mode in TARGET_MODES:
        assert not (choose_targets(mode, logits, y, seeded(1)) == y).any(), mode
    assert torch.equal(choose_targets("next", logits, y, None), (y + 1) % 10)
    assert torch.equal(choose_targets("least-likely", logits, y, None), logits.argmin(1))
    random = choose_targets("random", logits, y, seeded(1))
    assert torch.equal(random, choose_targets("random", logits, y, seeded(1)))
    assert not torch.equal(random, choose_targets("random", logits, y, seeded(2)))
    # Uniform over the other classes: every offset from y shows up, none dominates.
    counts = torch.bincount((random - y) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 30 and counts[1:].max() < 80
    # Equal logits: least-likely must still avoid y.
    flat = torch.zeros(4, 3)
    assert not (
        choose_targets("least-likely", flat, torch.zeros(4, dtype=torch.long), None) == 0
    ).any()


@pytest.mark.parametrize(
    ("name", "params", "threat"),
    [
        ("bim", {"targeted": True, "target": "next"}, Threat("linf", 0.3)),
        # The least-likely class is the hardest target: it needs a larger ball.
        ("mi-fgsm", {"targeted": True, "target": "least-likely"}, Threat("linf", 0.4)),
        ("pgd-targeted", {"steps": 20, "target": "random"}, Threat("linf", 0.3)),
        ("cw-l2", {**CW_FAST, "targeted": True, "target": "random"}, Threat("l2", 3.0)),
    ],
)
def test_targeted_attacks_hit_their_targets(correct, name, params, threat):
    model, x, y = correct
    x, y = x[:60], y[:60]
    result = build_attack(name, params)(model, x, y, threat, generator=seeded(5))
    with torch.no_grad():
        # The attack draws its targets first from the generator it is given.
        targets = choose_targets(params["target"], model(x), y, seeded(5))
        hit = model(result.x_adv).argmax(1) == targets
    assert hit.float().mean() > 0.85
    assert not (hit & result.robust).any()  # on target means misclassified


# --- invariants ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "threat"),
    [
        ("bim", {}, Threat("linf", 0.1)),
        ("bim", {"norm": "l2", "targeted": True}, Threat("l2", 1.0)),
        ("mi-fgsm", {}, Threat("l2", 0.5)),
        ("r-fgsm", {}, Threat("l2", 1.0)),
        ("r-fgsm", {"rel_alpha": 0.3}, Threat("linf", 0.2)),
        ("pgd-targeted", {"steps": 10}, Threat("l2", 1.0)),
        ("deepfool", {"steps": 20}, Threat("linf", 0.1)),
        ("deepfool", {"steps": 20}, Threat("l2", 0.5)),
        ("cw-l2", {**CW_FAST, "binary_steps": 2}, Threat("l2", 0.5)),
    ],
)
def test_stays_in_the_ball_and_the_box(standard, name, params, threat):
    model, x, y = standard
    x, y = x[:80], y[:80]
    result = build_attack(name, params)(model, x, y, threat, generator=seeded())
    distance = get_norm(threat.norm).distance(result.x_adv, x)
    assert distance.max() <= threat.eps + 1e-5
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.equal(result.x_adv[~result.clean_correct], x[~result.clean_correct])
    # What the attack reports is what the model says on the returned points, except
    # where two logits tie to float precision: DeepFool stops right on the boundary, and
    # a forward pass over another batch may round such a point to either side.
    with torch.no_grad():
        top = model(result.x_adv).topk(2, dim=1).values
    decided = (top[:, 0] - top[:, 1]) > 1e-5
    says = accuracy(model, result.x_adv, y) & result.clean_correct
    assert torch.equal(result.robust[decided], says[decided])
    assert result.grad_evals == sum(result.active_per_step) > 0
    assert 0 < result.robust.sum() < result.clean_correct.sum()  # the eps means something


@pytest.mark.parametrize("name", ["deepfool", "cw-l2"])
def test_minimal_attacks_drop_the_examples_they_are_done_with(correct, name):
    model, x, y = correct
    params = {"steps": 20} if name == "deepfool" else {**CW_FAST, "binary_steps": 2}
    result = build_attack(name, params)(model, x, y, Threat("l2", 1.5), batch_size=len(x))
    counts = result.active_per_step
    assert counts[0] == len(x) and counts[-1] < len(x)
    full = (20 * 9 if name == "deepfool" else 100) * len(x)
    assert result.grad_evals < 0.5 * full


def test_momentum_zero_is_bim(standard):
    """MI-FGSM's loop with no momentum retraces PGD's: one checks the other."""
    model, x, y = standard
    for threat in (Threat("linf", 0.1), Threat("l2", 0.5)):
        bim = build_attack("bim", {"steps": 8, "rel_stepsize": 0.2})(model, x, y, threat)
        params = {"steps": 8, "rel_stepsize": 0.2, "momentum": 0.0}
        mi = build_attack("mi-fgsm", params)(model, x, y, threat)
        assert torch.allclose(bim.x_adv, mi.x_adv, atol=1e-5)
        assert torch.equal(bim.robust, mi.robust)
        assert bim.active_per_step == mi.active_per_step


def test_rfgsm_differs_from_fgsm_and_stays_in_the_ball(standard):
    model, x, y = standard
    threat = Threat("linf", 0.1)
    fgsm = build_attack("fgsm")(model, x, y, threat)
    rfgsm = build_attack("r-fgsm")(model, x, y, threat, generator=seeded())
    attacked = rfgsm.clean_correct
    assert not torch.allclose(rfgsm.x_adv[attacked], fgsm.x_adv[attacked])
    assert (rfgsm.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert rfgsm.x_adv.min() >= 0 and rfgsm.x_adv.max() <= 1
    # One gradient per point, like FGSM; and it is the weaker attack on an undefended
    # model (half the budget spent on noise), as Tramer et al. intend only for masking.
    assert rfgsm.grad_evals == fgsm.grad_evals == int(attacked.sum())
    assert rfgsm.robust.sum() >= fgsm.robust.sum()


# --- registry, repr, validation ------------------------------------------------------


def test_new_attacks_are_registered():
    assert set(NEW) <= set(ATTACKS)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("mi-fgsm", {"momentum": -0.5}, r"Expected `momentum` to be a float in \[0, 10\]"),
        ("mi-fgsm", {"momentum": "high"}, "`momentum`"),
        ("deepfool", {"overshoot": -0.01}, r"Expected `overshoot` to be a float in \[0, 10\]"),
        ("deepfool", {"candidates": 1}, r"`candidates` to be an integer \[2, 100000\]"),
        ("deepfool", {"steps": 0}, r"`steps` to be an integer \[1, 10000\]"),
        ("bim", {"target": "far"}, "Expected `target` to be one of 'random', 'least-likely'"),
        ("bim", {"targeted": "yes"}, "`targeted` to be true or false"),
        ("pgd-targeted", {"target": None}, "`target`"),
        ("r-fgsm", {"rel_alpha": 1.0}, r"Expected `rel_alpha` to be a float in \(0, 1\)"),
        ("r-fgsm", {"rel_alpha": 0}, r"\(0, 1\)"),
        ("cw-l2", {"binary_steps": 0}, "`binary_steps`"),
        ("cw-l2", {"initial_const": 0.0}, "`initial_const`"),
        ("cw-l2", {"lr": -1.0}, "`lr`"),
        ("cw-l2", {"confidence": -1}, "`confidence`"),
        ("cw-l2", {"norm": "l2"}, r"Unknown parameter\(s\) norm"),
    ],
)
def test_bad_params_raise(name, params, message):
    with pytest.raises(GauntletError, match=message):
        build_attack(name, params)


def test_threat_norm_checks():
    with pytest.raises(GauntletError, match="attacks the l2 norm, but the threat is linf"):
        validate_attack("cw-l2", None, Threat("linf", 0.1))
    with pytest.raises(GauntletError, match="attacks the linf norm"):
        validate_attack("deepfool", {"norm": "linf"}, Threat("l2", 0.5))
    with pytest.raises(GauntletError, match="attacks the l2 norm"):
        validate_attack("bim", {"norm": "l2"}, Threat("linf", 0.1))
    validate_attack("deepfool", None, Threat("linf", 0.1))
    validate_attack("r-fgsm", {"norm": "l2"}, Threat("l2", 1.0))
