"""Black-box, universal and patch attacks against torchattacks, ART and closed forms.

Budgets are small (digits are 8x8): each comparison runs both sides at the same budget
and seed, so the claims are relative ("at least as strong as the reference"), not
absolute numbers that only a long run reaches.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import Threat, build_attack
from gauntlet.workers.attacks.nes import estimate_gradient
from gauntlet.workers.attacks.patch import patch_side
from gauntlet.workers.attacks.universal import fit_points_subset
from gauntlet.workers.datasets import eval_subset, load_split
from gauntlet.workers.models import InputSpec, load_classifier

SPEC = InputSpec(1, 8, 8, 10)


@pytest.fixture(scope="module")
def standard(digits_models):
    return load_classifier(digits_models["standard"], "small-cnn", SPEC)


@pytest.fixture(scope="module")
def points():
    """100 test points; the first label is flipped so one point is never attacked."""
    x, y, _ = eval_subset("digits", 100, 0, None)
    y = y.clone()
    y[0] = (y[0] + 1) % 10
    return x, y


@pytest.fixture(scope="module")
def train():
    return load_split("digits", "train", None)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


class _Float32(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on shared busy cores a second
    spinning thread slows every forward pass down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


# --- parameters ---------------------------------------------------------------------


def test_black_box_and_fitted_attacks_declare_themselves():
    assert build_attack("square").black_box and build_attack("nes").black_box
    assert build_attack("universal").needs_train_data
    patch = build_attack("patch")
    assert patch.needs_train_data and patch.unbounded and not patch.needs_threat


# Values each check must refuse, by attack and hyperparameter: out of range, wrong type,
# odd NES samples (antithetic pairs), a NES budget below one estimate plus its check.
BAD_VALUES = {
    "square": {"queries": [0], "p_init": [0.0, 1.5], "restarts": [0], "loss": ["dlr"]},
    "nes": {
        "samples": [51, 0],
        "sigma": [0.0],
        "queries": [50],
        "steps": [0],
        "rel_stepsize": [-1.0],
        "loss": ["hinge"],
    },
    "universal": {"fit_points": [0], "epochs": [1.5], "rel_stepsize": [0]},
    "patch": {"size": [0.0, 2.0], "epochs": [0], "step_size": [True]},
}


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        (name, field, value)
        for name, fields in BAD_VALUES.items()
        for field, values in fields.items()
        for value in values
    ],
)
def test_bad_params_raise(name, field, value):
    with pytest.raises(GauntletError, match=f"Expected `{field}`"):
        build_attack(name, {field: value})


# --- Square -------------------------------------------------------------------------


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.0)])
def test_square_at_least_as_strong_as_torchattacks(standard, points, norm, eps):
    import torchattacks

    x, y = points
    budget = 300
    result = build_attack("square", {"queries": budget})(standard, x, y, Threat(norm, eps))
    reference = torchattacks.Square(
        standard,
        norm={"linf": "Linf", "l2": "L2"}[norm],
        eps=eps,
        n_queries=budget,
        n_restarts=1,
        p_init=0.8,
        loss="margin",
        seed=0,
    )
    ours = result.robust.float().mean().item()
    theirs = accuracy(standard, reference(x, y), y)
    print(
        f"square {norm} eps={eps} q={budget}: robust acc ours {ours:.3f} torchattacks {theirs:.3f}"
    )
    assert ours <= theirs + 0.01
    assert ours < result.clean_correct.float().mean().item() - 0.2

    queries, clean = result.queries, result.clean_correct
    assert queries.dtype == torch.int64 and not clean[0] and queries[0] == 0
    assert (queries[~clean] == 0).all() and (queries[clean] >= 1).all()
    assert queries.max() <= budget
    # Robust points spent the whole budget; fooled ones stopped when fooled.
    fooled = clean & ~result.robust
    assert (queries[clean & result.robust] == budget).all()
    assert queries[fooled].float().mean() < budget / 2
    assert accuracy(standard, result.x_adv[fooled], y[fooled]) == 0.0
    distance = (result.x_adv - x).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1)
    assert distance.max() <= eps + 1e-5


def test_square_is_seeded(standard, points):
    x, y = points
    attack = build_attack("square", {"queries": 50})
    runs = [attack(standard, x, y, Threat("linf", 0.1), generator=seeded(3)) for _ in range(2)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)


# --- NES ----------------------------------------------------------------------------


def test_nes_estimate_matches_a_linear_gradient():
    torch.manual_seed(1)  # not the estimator's seed: w must not be its first direction
    w = torch.randn(1, 64)
    x = torch.rand(4, 1, 8, 8)

    def linear(points, labels):
        return points.flatten(1) @ w[0]

    many = estimate_gradient(linear, x, torch.zeros(4, dtype=torch.long), 2000, 1e-3, seeded())
    true = w.view(1, 1, 8, 8).expand_as(x)
    assert (cosine(many, true) > 0.9).all()
    # Unbiased, and scaled right: the projection on w is w's own length.
    projection = (many.flatten(1) @ w[0]) / w.norm() ** 2
    assert torch.allclose(projection, torch.ones(4), atol=0.15)
    few = estimate_gradient(linear, x, torch.zeros(4, dtype=torch.long), 2, 1e-3, seeded())
    assert (cosine(few, true) < 0.5).all()


def test_nes_estimate_agrees_with_art():
    from art.estimators.classification import (
        PyTorchClassifier,
        QueryEfficientGradientEstimationClassifier,
    )

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(5, 1, 8, 8)
    y = torch.arange(5)

    def ce(points, labels):
        with torch.no_grad():
            return F.cross_entropy(linear(points), labels, reduction="none")

    ours = estimate_gradient(ce, x, y, 1000, 1e-3, seeded())
    # ART scores probabilities (its loss is the KL divergence from the one-hot label),
    # and its float64 noise must be cast back for the float32 layer.
    probs = PyTorchClassifier(
        nn.Sequential(_Float32(), linear, nn.Softmax(dim=1)),
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
    )
    np.random.seed(0)
    # num_basis antithetic pairs: 500 spends the same 1000 evaluations per point as ours.
    art = QueryEfficientGradientEstimationClassifier(probs, num_basis=500, sigma=1e-3)
    theirs = torch.tensor(art.loss_gradient(x.numpy(), np.eye(10)[y.numpy()]))
    xg = x.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(F.cross_entropy(linear(xg), y, reduction="sum"), xg)
    print(f"nes vs art cosine: {cosine(ours, theirs).tolist()}")
    assert (cosine(ours, theirs) > 0.8).all()
    assert (cosine(ours, true) > 0.9).all() and (cosine(theirs, true) > 0.9).all()


def test_nes_approaches_white_box_pgd(standard, points):
    x, y = points[0][:60], points[1][:60]
    threat, steps, samples = Threat("l2", 0.5), 10, 200
    pgd = build_attack("pgd", {"steps": steps, "random_start": False})(standard, x, y, threat)
    budget = steps * (samples + 1)
    params = {"samples": samples, "steps": steps, "queries": budget, "loss": "ce"}
    nes = build_attack("nes", params)(standard, x, y, threat)
    ours, white = nes.robust.float().mean().item(), pgd.robust.float().mean().item()
    print(f"nes robust acc {ours:.3f} vs pgd {white:.3f}")
    assert ours <= white + 0.05
    assert ours < nes.clean_correct.float().mean().item() - 0.2
    queries, clean = nes.queries, nes.clean_correct
    assert queries[0] == 0 and queries.max() <= budget
    # Every forward on every example counts: each step is samples + one check.
    assert (queries[clean] % (samples + 1) == 0).all()
    assert (queries[clean & nes.robust] == budget).all()
    # Fooled points left early: most of them within the first few steps.
    assert queries[clean & ~nes.robust].float().mean() < budget / 2


# --- universal perturbations --------------------------------------------------------


def test_universal_is_one_delta_that_transfers(standard, points, train):
    x, y = points
    threat = Threat("linf", 0.2)
    attack = build_attack("universal", {"fit_points": 300, "epochs": 5})
    with pytest.raises(GauntletError, match="fitted"):
        attack(standard, x, y, threat)
    attack.fit(standard, *train, threat, seeded())
    result = attack(standard, x, y, threat)
    delta = attack.delta
    assert delta is not None and delta.shape == (1, 1, 8, 8)
    assert delta.abs().max() <= 0.2 + 1e-6
    # Every attacked point moves by the same delta, wherever [0, 1] does not clip it.
    attacked = result.clean_correct
    unclipped = ((x + delta) > 0) & ((x + delta) < 1) & attacked[:, None, None, None]
    moved = result.x_adv - x
    assert torch.allclose(moved[unclipped], delta.expand_as(x)[unclipped], atol=1e-6)
    clean = result.clean_correct.float().mean().item()
    robust = result.robust.float().mean().item()
    print(f"universal linf 0.2: clean {clean:.3f} robust {robust:.3f}")
    assert robust < clean - 0.25
    with pytest.raises(GauntletError, match="fitted for"):
        attack(standard, x, y, Threat("linf", 0.1))

    l2 = Threat("l2", 1.5)
    attack.fit(standard, *train, l2, seeded())
    assert attack.delta is not None and attack.delta.norm() <= 1.5 + 1e-5
    result = attack(standard, x, y, l2)
    assert (result.x_adv - x).flatten(1).norm(dim=1).max() <= 1.5 + 1e-5
    assert result.robust.float().mean().item() < clean - 0.25


def test_universal_at_least_as_strong_as_art(standard, points, train):
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    x, y = points
    eps = 0.2
    # The same 100 fitting points for both (correctly classified, so ours keeps all).
    xs, ys = fit_points_subset(standard, *train, 100, seeded())
    ours = build_attack("universal", {"fit_points": 100, "epochs": 10})
    ours.fit(standard, xs, ys, Threat("linf", eps), seeded())
    result = ours(standard, x, y, Threat("linf", eps))
    ours_rate = 1 - result.robust[result.clean_correct].float().mean().item()

    classifier = PyTorchClassifier(
        standard,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    random.seed(0)  # ART shuffles with Python's random
    art = UniversalPerturbation(
        classifier,
        attacker="fgsm",
        attacker_params={"eps": eps, "norm": np.inf},
        eps=eps,
        norm=np.inf,
        max_iter=2,
        verbose=False,
    )
    art.generate(xs.numpy(), ys.numpy())
    noise = torch.tensor(art.noise, dtype=x.dtype)
    clean = result.clean_correct
    art_robust = (standard((x + noise).clamp(0, 1)).argmax(dim=1) == y) & clean
    art_rate = 1 - art_robust[clean].float().mean().item()
    print(f"universal fooling rate: ours {ours_rate:.3f} art {art_rate:.3f}")
    assert ours_rate >= art_rate - 0.02


# --- adversarial patch --------------------------------------------------------------


def test_patch_changes_one_square_and_beats_noise(standard, points, train):
    x, y = points
    attack = build_attack("patch", {"size": 0.5, "fit_points": 300, "epochs": 5})
    with pytest.raises(GauntletError, match="fitted"):
        attack(standard, x, y, None)
    attack.fit(standard, *train, None, seeded())
    side = patch_side(0.5, 8, 8)
    assert attack.patch is not None and attack.patch.shape == (1, side, side)
    # A threat is ignored: a patch is not an Lp-ball attack.
    result = attack(standard, x, y, Threat("linf", 0.01))
    changed = (result.x_adv != x).flatten(2).any(dim=1).view(-1, 8, 8)
    for mask in changed:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        if len(rows):
            assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
    assert not changed[~result.clean_correct].any()  # points not attacked are untouched
    trained = result.robust.float().mean().item()
    noise = []
    for seed in range(3):
        attack.patch = torch.rand((1, side, side), generator=seeded(seed))
        noise.append(attack(standard, x, y, None).robust.float().mean().item())
    print(f"patch robust acc: trained {trained:.3f}, random noise {noise}")
    assert trained < min(noise) - 0.1
