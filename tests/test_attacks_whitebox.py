"""The iterative, DeepFool and Carlini-Wagner attacks: closed forms, invariants, references.

torchattacks is the independent reference (BIM, MI-FGSM, R+FGSM, DeepFool, CW) on the
standard digits CNN; linear models give closed forms for the minimal-perturbation
attacks. Point counts and step counts are small: the whole file is CPU-bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import ATTACKS, Threat, build_attack, validate_attack
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.targets import TARGET_MODES, choose_targets
from gauntlet.workers.datasets import eval_subset
from gauntlet.workers.models import InputSpec, load_classifier

NEW = ("bim", "mi-fgsm", "r-fgsm", "pgd-targeted", "deepfool", "cw-l2")
# Fast CW settings: lr 0.2 lets saturated digit pixels move within 50 steps (see cw.py).
CW_FAST = {"steps": 50, "binary_steps": 4, "initial_const": 0.1, "lr": 0.2}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def standard(digits_models):
    """(model, x, y): the undefended digits CNN and 200 test points."""
    spec = InputSpec(1, 8, 8, 10)
    model = load_classifier(digits_models["standard"], "small-cnn", spec).eval()
    x, y, _ = eval_subset("digits", 200, 0, None)
    return model, x, y


@pytest.fixture(scope="module")
def correct(standard):
    """(model, x, y): the first 100 points, only those the model gets right."""
    model, x, y = standard
    x, y = x[:100], y[:100]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return model, x[keep], y[keep]


@pytest.fixture(scope="module")
def minimal(correct):
    """Unbounded perturbation sizes per attack (inf where none was found), computed once."""
    model, x, y = correct
    sizes = {}
    for name, attack in (
        ("deepfool", build_attack("deepfool")),
        ("cw", build_attack("cw-l2", CW_FAST)),
    ):
        x_adv, found = attack.minimal(model, x, y)
        with torch.no_grad():
            assert torch.equal(found, model(x_adv).argmax(1) != y)
        size = (x_adv - x).flatten(1).norm(dim=1)
        sizes[name] = torch.where(found, size, torch.inf)
    return sizes


def robust_at(model, x_adv, x, y, eps: float) -> float:
    """Robust accuracy at an L2 budget from unbounded attack points."""
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    within = (x_adv - x).flatten(1).norm(dim=1) <= eps
    return 1.0 - (fooled & within).float().mean().item()


def accuracy(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


# --- against torchattacks ------------------------------------------------------------


def assert_same_path(model, ours, theirs_adv: torch.Tensor, y: torch.Tensor) -> None:
    """Ours follows the reference's deterministic path, stopping once an example is fooled.

    So whatever the reference fools ours fools too, and where ours never stopped (the
    points it leaves robust) it ends exactly where the reference does. One exception
    allowed each: a ~0 gradient entry can take either sign.
    """
    theirs = accuracy(model, theirs_adv, y)
    ours_acc, theirs_acc = ours.robust.float().mean().item(), theirs.float().mean().item()
    assert 0.2 < theirs_acc < 0.95  # a regime where the two can disagree
    assert ours_acc <= theirs_acc + 0.01
    assert (ours.robust & ~theirs).sum() <= 1
    gap = (ours.x_adv - theirs_adv).flatten(1).abs().amax(dim=1)
    assert (ours.robust & (gap > 1e-5)).sum() <= 1


def test_bim_matches_torchattacks(standard):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = standard
    eps, steps = 0.1, 10
    ours = build_attack("bim", {"steps": steps})(model, x, y, Threat("linf", eps))
    reference = torchattacks.BIM(model, eps=eps, alpha=1.25 * eps / steps, steps=steps)
    assert_same_path(model, ours, reference(x, y), y)


def test_mifgsm_matches_torchattacks(standard):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = standard
    eps, steps = 0.1, 10
    ours = build_attack("mi-fgsm", {"steps": steps})(model, x, y, Threat("linf", eps))
    reference = torchattacks.MIFGSM(model, eps=eps, alpha=eps / steps, steps=steps, decay=1.0)
    # Their gradient / mean|g| and our gradient / sum|g| differ by a constant factor, so
    # the momentum buffers differ by that factor and their signs agree.
    assert_same_path(model, ours, reference(x, y), y)


def test_rfgsm_matches_torchattacks_with_the_same_noise(correct):
    """torchattacks' RFGSM with alpha = eps / 2 and one step is Tramer et al.'s R+FGSM.

    On points all classified correctly, both draw the noise for the same shape from a
    generator seeded alike, so the random steps are the same and results pair up.
    """
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = correct
    eps = 0.15
    for seed in range(3):
        ours = build_attack("r-fgsm")(model, x, y, Threat("linf", eps), generator=seeded(seed))
        torch.manual_seed(seed)
        reference = torchattacks.RFGSM(model, eps=eps, alpha=eps / 2, steps=1)
        assert_same_path(model, ours, reference(x, y), y)


@pytest.fixture(scope="module")
def references(correct):
    """torchattacks' DeepFool and CW points (unbounded), computed once for every budget."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = correct
    n = 40  # torchattacks' DeepFool loops over single images: slow
    deepfool = torchattacks.DeepFool(model, steps=10, overshoot=0.02)(x[:n], y[:n])
    deepfool = deepfool[0] if isinstance(deepfool, tuple) else deepfool  # (adv, targets) in some
    cw = torchattacks.CW(model, c=1, kappa=0, steps=50, lr=0.01)(x, y)
    return {"deepfool": deepfool, "cw": cw}


@pytest.mark.parametrize("eps", [0.4, 0.6, 0.8])
def test_deepfool_matches_torchattacks_at_l2_budgets(correct, references, eps):
    model, x, y = correct
    theirs = references["deepfool"]
    x, y = x[: len(theirs)], y[: len(theirs)]
    ours, _ = build_attack("deepfool", {"steps": 10}).minimal(model, x, y)
    ours_acc, theirs_acc = robust_at(model, ours, x, y, eps), robust_at(model, theirs, x, y, eps)
    assert ours_acc <= theirs_acc + 0.01
    assert 0.0 < ours_acc < 1.0  # the budget separates found from not found


@pytest.mark.parametrize("eps", [0.4, 0.6, 0.8])
def test_cw_matches_torchattacks_at_l2_budgets(correct, minimal, references, eps):
    model, x, y = correct
    ours_acc = 1.0 - (minimal["cw"] <= eps).float().mean().item()
    theirs_acc = robust_at(model, references["cw"], x, y, eps)
    assert ours_acc <= theirs_acc + 0.01
    assert 0.0 < ours_acc < 1.0


# --- minimal perturbations -----------------------------------------------------------


def test_minimal_attacks_find_smaller_perturbations_than_pgd(correct, minimal):
    model, x, y = correct
    threat = Threat("l2", 1.5)
    pgd = build_attack("pgd", {"norm": "l2", "steps": 20})(model, x, y, threat)
    assert pgd.robust.float().mean() < 0.05  # a budget where PGD succeeds
    fooled = ~pgd.robust
    pgd_median = (pgd.x_adv - x).flatten(1).norm(dim=1)[fooled].median()
    # Without a random start and in fine steps, PGD stops near its first fooling point:
    # a much harder bar, which DeepFool's linear search still clears.
    walk = build_attack("pgd", {"norm": "l2", "steps": 40, "random_start": False})
    walked = walk(model, x, y, Threat("l2", 2.0))
    walk_median = (walked.x_adv - x).flatten(1).norm(dim=1)[~walked.robust].median()
    for name, sizes in minimal.items():
        assert torch.isfinite(sizes).float().mean() > 0.95, name
        median = sizes[torch.isfinite(sizes)].median()
        assert median < 0.6 * pgd_median, name
    deepfool = minimal["deepfool"]
    assert deepfool[torch.isfinite(deepfool)].median() < 0.95 * walk_median


def binary_linear(w: torch.Tensor, b: float) -> nn.Module:
    """Logits (0, w.x + b): the boundary is the hyperplane w.x + b = 0."""
    layer = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[1] = w
        layer.bias[1] = b
    return nn.Sequential(nn.Flatten(), layer).eval()


@pytest.fixture
def linear_case():
    """A linear model, inputs away from 0 and 1, all classified 0, at known distances."""
    gen = seeded(0)
    w = torch.randn(16, generator=gen)
    x = 0.4 + 0.2 * torch.rand(8, 1, 4, 4, generator=gen)
    z = x.flatten(1) @ w
    model = binary_linear(w, -(z.max() + 0.3).item())
    gap = -(z - z.max() - 0.3)  # > 0: distance to the boundary along the logit
    return model, x, torch.zeros(8, dtype=torch.long), w, gap


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_is_exact_on_a_linear_model(linear_case, norm):
    model, x, y, w, gap = linear_case
    attack = build_attack("deepfool", {"norm": norm, "overshoot": 0.02})
    x_adv, found = attack.minimal(model, x, y)
    assert found.all()
    # One step to the hyperplane (plus DeepFool's 1e-4 nudge), then the overshoot.
    if norm == "l2":
        expected = x + (1.02 * (gap + 1e-4) / w.norm() ** 2).view(-1, 1, 1, 1) * w.view(1, 1, 4, 4)
    else:
        step = (1.02 * (gap + 1e-4) / w.abs().sum()).view(-1, 1, 1, 1)
        expected = x + step * w.sign().view(1, 1, 4, 4)
    assert torch.allclose(x_adv, expected, atol=1e-5)


def test_cw_finds_the_closest_point_on_a_linear_model(linear_case):
    model, x, y, w, gap = linear_case
    exact = gap / w.norm()  # L2 distance to the hyperplane
    attack = build_attack("cw-l2", {"steps": 300, "binary_steps": 8, "lr": 0.01})
    x_adv, found = attack.minimal(model, x, y)
    assert found.all()
    size = (x_adv - x).flatten(1).norm(dim=1)
    assert (size >= exact * (1 - 1e-3)).all()  # nothing beats the exact distance
    assert (size <= exact * 1.05).all()


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
    # What the attack reports is what the model says on the returned points.
    assert torch.equal(result.robust, accuracy(model, result.x_adv, y) & result.clean_correct)
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


def test_registered_with_stable_reprs():
    assert set(NEW) <= set(ATTACKS)
    assert repr(build_attack("bim")) == (
        "BIM(norm=None, steps=10, rel_stepsize=0.125, targeted=False, target='random')"
    )
    assert repr(build_attack("mi-fgsm", {"norm": "linf", "steps": 20})) == (
        "MIFGSM(norm='linf', steps=20, rel_stepsize=0.05, momentum=1.0, targeted=False, "
        "target='random')"
    )
    assert repr(build_attack("r-fgsm")) == "RFGSM(norm=None, rel_alpha=0.5)"
    assert repr(build_attack("pgd-targeted", {"target": "next"})) == (
        "PGDTargeted(norm=None, steps=40, rel_stepsize=0.0625, random_start=True, target='next')"
    )
    assert repr(build_attack("deepfool")) == (
        "DeepFool(norm=None, steps=50, overshoot=0.02, candidates=10)"
    )
    assert repr(build_attack("cw-l2")) == (
        "CarliniWagnerL2(steps=1000, binary_steps=5, initial_const=0.01, lr=0.01, "
        "confidence=0.0, abort_early=True, targeted=False, target='random')"
    )
    for name in NEW:
        assert repr(build_attack(name)) == repr(build_attack(name, {}))


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
