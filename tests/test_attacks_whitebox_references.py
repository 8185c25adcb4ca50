"""White-box attacks against references: torchattacks paths, minimal sizes, closed forms.

torchattacks is the independent reference (BIM, MI-FGSM, R+FGSM, DeepFool, CW) on the
standard digits CNN; linear models give closed forms for the minimal-perturbation
attacks. Point counts and step counts are small: the whole file is CPU-bound.
"""

from __future__ import annotations

import pytest
import torch

from gauntlet.workers.attacks import Threat, build_attack
from tests.attack_helpers import (
    CW_FAST,
    accuracy,
    binary_linear,
    seeded,
)


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
