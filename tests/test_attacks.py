"""Attacks against closed forms, invariants, and torchattacks as an independent reference.

The trained model is a small CNN on scikit-learn's digits (ships offline), trained once
per module in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import (
    ATTACKS,
    FGSM,
    PGD,
    Attack,
    AttackResult,
    Clean,
    Threat,
    build_attack,
    register_attack,
    validate_attack,
)
from gauntlet.workers.attacks.base import RunOutput
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.training import fit
from tests.attack_helpers import binary_linear


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def digits():
    """(model, x_test, y_test): an undefended CNN at ~97% test accuracy on digits."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1300], perm[1300:]
    model = small_cnn()
    fit(model, x[train], y[train], epochs=4, lr=1e-2, batch_size=64, seed=0)
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        assert (model(x[test]).argmax(1) == y[test]).float().mean() > 0.93
    return model, x[test], y[test]


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def robust_acc(result: AttackResult) -> float:
    return result.robust.float().mean().item()


# --- closed forms on a linear model --------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_matches_the_closed_form_on_a_linear_model(norm):
    gen = seeded(0)
    w = torch.randn(16, generator=gen)
    # Inputs away from 0 and 1, so no clipping interferes with the closed form.
    x = 0.3 + 0.4 * torch.rand(6, 1, 4, 4, generator=gen)
    eps = 0.1
    margin = w.abs().sum() * eps if norm == "linf" else w.norm() * eps
    # The bias puts every logit gap below zero (all clean-correct), the largest ones within
    # reach of one step (flipped) and the smallest out of reach (robust).
    z = x.flatten(1) @ w
    model = binary_linear(w, 0.0)
    bias = -(z.max() + 0.5 * margin).item()
    model[1].bias.data[1] = bias
    result = FGSM()(model, x, torch.zeros(6, dtype=torch.long), Threat(norm, eps))

    direction = w.sign() if norm == "linf" else w / w.norm()
    expected = x + eps * direction.view(1, 1, 4, 4)
    assert torch.allclose(result.x_adv, expected, atol=1e-6)
    logit_change = (result.x_adv - x).flatten(1) @ w
    assert torch.allclose(logit_change, torch.full((6,), margin.item()), atol=1e-4)
    gaps = z + bias
    assert result.clean_correct.all()
    assert torch.equal(result.robust, gaps + margin < 0)
    assert result.robust.any() and not result.robust.all()
    assert result.grad_evals == 6 and result.active_per_step == [6]


# --- the norm axis -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linf", "l2"])
def test_norm_axis(name):
    norm, gen, eps = get_norm(name), seeded(0), 0.3
    x = torch.rand(64, 3, 4, 4, generator=gen)
    start = norm.random_start(x, eps, gen)
    assert norm.distance(start, x).max() <= eps + 1e-6
    assert norm.distance(start, x).min() > 0.5 * eps  # spread to the boundary, not huddled
    far = x + 3 * torch.randn(x.shape, generator=gen)
    projected = norm.project(far, x, eps)
    assert torch.allclose(norm.distance(projected, x), torch.full((64,), eps), atol=1e-6)
    # The fused in-loop version is the same as projecting and then clipping.
    fused = norm.project_clip(far.clone(), norm.constraint(x, eps), eps)
    assert torch.allclose(fused, projected.clamp(0, 1), atol=1e-6)
    step = norm.normalise(torch.randn(x.shape, generator=gen))
    assert torch.allclose(norm.distance(step, torch.zeros_like(step)), torch.ones(64))


# --- invariants on the trained model -------------------------------------------------


@pytest.mark.parametrize(
    "threat", [Threat("linf", 0.1), Threat("linf", 0.3), Threat("l2", 0.5), Threat("l2", 2.0)]
)
def test_pgd_stays_in_the_ball_and_the_box(digits, threat):
    model, x, y = digits
    attack = PGD(steps=10, rel_stepsize=0.25)
    result = attack(model, x, y, threat, generator=seeded())
    distance = get_norm(threat.norm).distance(result.x_adv, x)
    assert distance.max() <= threat.eps + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    # Points the model gets wrong are not attacked and never robust.
    assert torch.equal(result.x_adv[~result.clean_correct], x[~result.clean_correct])
    assert not (result.robust & ~result.clean_correct).any()


def test_robust_mask_is_what_the_model_says_on_x_adv(digits):
    model, x, y = digits
    result = PGD(steps=10)(model, x, y, Threat("linf", 0.1), generator=seeded())
    with torch.no_grad():
        correct = model(result.x_adv).argmax(1) == y
    assert torch.equal(result.robust, correct & result.clean_correct)


@pytest.mark.parametrize("threat", [Threat("linf", 0.1), Threat("l2", 0.5)])
def test_pgd_is_at_least_as_strong_as_fgsm(digits, threat):
    model, x, y = digits
    pgd = PGD(steps=20, rel_stepsize=0.1)(model, x, y, threat, generator=seeded())
    fgsm = FGSM()(model, x, y, threat)
    assert robust_acc(pgd) <= robust_acc(fgsm)
    assert robust_acc(fgsm) > 0.3  # the comparison means something only if FGSM leaves some


def test_undefended_model_has_no_robustness_at_large_eps(digits):
    model, x, y = digits
    result = PGD(steps=20, rel_stepsize=0.1)(model, x, y, Threat("linf", 0.5), generator=seeded())
    assert result.clean_correct.float().mean() > 0.93
    assert robust_acc(result) == 0.0


def test_matches_torchattacks_pgd(digits):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    eps, steps, rel = 0.1, 20, 0.1
    ours, theirs = [], []
    # Averaged over three seeds: random starts alone move one run by about a point.
    for seed in range(3):
        attack = PGD(steps=steps, rel_stepsize=rel)
        ours.append(robust_acc(attack(model, x, y, Threat("linf", eps), generator=seeded(seed))))
        torch.manual_seed(seed)
        reference = torchattacks.PGD(model, eps=eps, alpha=rel * eps, steps=steps)
        adv = reference(x, y)
        with torch.no_grad():
            theirs.append((model(adv).argmax(1) == y).float().mean().item())
    ours_mean, theirs_mean = sum(ours) / 3, sum(theirs) / 3
    assert 0.3 < theirs_mean < 0.8  # a regime where the two can disagree
    # At least as strong, within one point either way: stopping at the first fooling
    # point can only make ours a little stronger.
    assert ours_mean <= theirs_mean + 0.01
    assert ours_mean >= theirs_mean - 0.01


def test_matches_torchattacks_pgd_exactly_without_random_start(digits):
    """Same deterministic path: whatever torchattacks fools, ours fools too."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    eps, steps, rel = 0.15, 10, 0.25
    ours = PGD(steps=steps, rel_stepsize=rel, random_start=False)
    result = ours(model, x, y, Threat("linf", eps))
    attack = torchattacks.PGD(model, eps=eps, alpha=rel * eps, steps=steps, random_start=False)
    adv = attack(x, y)
    with torch.no_grad():
        theirs = model(adv).argmax(1) == y
    assert (result.robust & ~theirs).sum() <= 1  # allow one sign flip of a ~0 gradient


def test_early_stopping_is_real(digits):
    model, x, y = digits
    steps = 20
    attack = PGD(steps=steps)
    result = attack(model, x, y, Threat("linf", 0.3), batch_size=len(x), generator=seeded())
    attacked = int(result.clean_correct.sum())
    assert result.grad_evals == sum(result.active_per_step)
    assert result.grad_evals < 0.5 * steps * attacked
    # Active sets only shrink within a batch (one batch here).
    counts = result.active_per_step
    assert counts[0] == attacked and all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_restarts_rerun_only_on_robust_points(digits):
    model, x, y = digits
    threat, steps = Threat("linf", 0.1), 5
    # One batch and the same seed: the first restart is identical, the second can only
    # fool more, and it starts from the points the first left robust.
    one = PGD(steps=steps)(model, x, y, threat, batch_size=len(x), generator=seeded())
    two = PGD(steps=steps, restarts=2)(model, x, y, threat, batch_size=len(x), generator=seeded())
    assert not (two.robust & ~one.robust).any()
    assert two.active_per_step[: len(one.active_per_step)] == one.active_per_step
    assert two.active_per_step[len(one.active_per_step)] == int(one.robust.sum())


def test_seeded_and_batch_size_independent(digits):
    model, x, y = digits
    threat = Threat("l2", 1.0)
    a = PGD(steps=5)(model, x, y, threat, generator=seeded(3))
    b = PGD(steps=5)(model, x, y, threat, generator=seeded(3))
    c = PGD(steps=5)(model, x, y, threat, generator=seeded(4))
    assert torch.equal(a.x_adv, b.x_adv) and not torch.equal(a.x_adv, c.x_adv)
    # Summed loss: per-example gradients do not depend on who shares the batch.
    big = FGSM()(model, x, y, threat, batch_size=512)
    small = FGSM()(model, x, y, threat, batch_size=37)
    assert torch.allclose(big.x_adv, small.x_adv, atol=1e-5)


def test_model_mode_restored_and_no_parameter_gradients(digits):
    model, x, y = digits
    model.train()
    calls = []
    PGD(steps=3)(
        model, x, y, Threat("linf", 0.1), batch_size=200, progress=lambda *a: calls.append(a)
    )
    assert model.training
    model.eval()
    assert all(p.grad is None for p in model.parameters())
    assert calls == [(200, len(x)), (400, len(x)), (len(x), len(x))]


def test_clean_attack(digits):
    model, x, y = digits
    result = Clean()(model, x, y, None)
    assert torch.equal(result.x_adv, x) and torch.equal(result.robust, result.clean_correct)
    assert result.grad_evals == 0
    # A threat given to "clean" is ignored.
    again = build_attack("clean")(model, x, y, Threat("linf", 0.3))
    assert torch.equal(again.robust, result.robust)


def test_call_rejects_bad_inputs(digits):
    model, x, y = digits
    with pytest.raises(GauntletError, match="needs a threat"):
        PGD()(model, x, y, None)
    with pytest.raises(GauntletError, match=r"in \[0, 1\]"):
        PGD()(model, x * 2, y, Threat("linf", 0.1))
    with pytest.raises(GauntletError, match="labels of shape"):
        PGD()(model, x, y[:-1], Threat("linf", 0.1))
    with pytest.raises(GauntletError, match="attacks the l2 norm"):
        PGD(norm="l2")(model, x, y, Threat("linf", 0.1))


# --- registry and submit-time validation ---------------------------------------------


def test_build_attack_errors():
    known = r"Unknown attack 'cw'; known attacks: (.*, )?clean, (.*, )?fgsm"
    with pytest.raises(GauntletError, match=known):
        build_attack("cw")
    with pytest.raises(GauntletError, match=r"Unknown parameter\(s\) stepz .*accepted.*steps"):
        build_attack("pgd", {"stepz": 3})
    with pytest.raises(GauntletError, match="accepted parameters: none"):
        build_attack("clean", {"eps": 0.1})
    with pytest.raises(GauntletError, match=r"Expected `steps` to be an integer \[1, 10000\]"):
        build_attack("pgd", {"steps": 0})
    with pytest.raises(GauntletError, match="`rel_stepsize`"):
        build_attack("pgd", {"rel_stepsize": "big"})
    with pytest.raises(GauntletError, match="`random_start` to be true or false"):
        build_attack("pgd", {"random_start": 1})
    with pytest.raises(GauntletError, match="`norm`"):
        build_attack("fgsm", {"norm": "l1"})
    with pytest.raises(GauntletError, match="restarts"):
        build_attack("pgd", {"restarts": 3, "random_start": False})


@pytest.mark.parametrize(
    ("threat", "message"),
    [
        (
            Threat("linf", 3),
            r"Expected `eps` to be a float in \(0, 1\] for the linf threat, but got 3",
        ),
        (Threat("linf", 0.0), r"\(0, 1\]"),
        (Threat("linf", -0.1), r"\(0, 1\]"),
        (Threat("linf", math.nan), r"\(0, 1\]"),
        (Threat("l2", 0), r"\(0, 1000\] for the l2 threat"),
        (Threat("l2", 1001.0), r"\(0, 1000\]"),
        (Threat("l2", math.inf), r"\(0, 1000\]"),
        (Threat("l2", True), "a float, but got True"),
        (Threat("linf", "8/255"), "a float, but got '8/255'"),
        (Threat("l1", 0.1), r"Expected `norm` to be one of 'linf', 'l2', but got 'l1'"),
        (None, "needs a threat"),
    ],
)
def test_validate_attack_rejects_bad_threats(threat, message):
    with pytest.raises(GauntletError, match=message):
        validate_attack("pgd", {"steps": 10}, threat)


def test_validate_attack_accepts_good_input():
    validate_attack("pgd", None, Threat("linf", 8 / 255))
    validate_attack("pgd", {"norm": "l2"}, Threat("l2", 1000))
    validate_attack("fgsm", {}, Threat("linf", 1))
    validate_attack("clean", None, None)
    validate_attack("clean", {}, Threat("linf", 5.0))  # ignored, not checked
    with pytest.raises(GauntletError, match="attacks the l2 norm"):
        validate_attack("pgd", {"norm": "l2"}, Threat("linf", 0.1))
    with pytest.raises(GauntletError, match="Unknown attack"):
        validate_attack("PGD", None, Threat("linf", 0.1))


def test_third_party_attack_registers_like_the_built_ins(digits):
    model, x, y = digits

    @register_attack
    class Noise(Attack):
        """Adds a fixed +eps shift: a stand-in for someone else's attack."""

        name = "test-noise"

        def __init__(self, *, scale: float = 1.0) -> None:
            self.scale = scale

        def config(self):
            return {"scale": self.scale}

        def run(self, model, x, y, threat, generator):
            x_adv = (x + self.scale * threat.eps).clamp(0, 1)
            with torch.no_grad():
                return RunOutput(x_adv, model(x_adv).argmax(1) != y)

    try:
        attack = build_attack("test-noise", {"scale": 0.5})
        assert repr(attack) == "Noise(scale=0.5)"
        result = attack(model, x, y, Threat("linf", 0.2))
        assert result.robust.sum() <= result.clean_correct.sum()
        with pytest.raises(RuntimeError, match="outside the threat"):
            build_attack("test-noise", {"scale": 2.0})(model, x, y, Threat("linf", 0.2))
    finally:
        del ATTACKS["test-noise"]


def test_a_third_party_table_attack_gets_checks_repr_and_accepted_names(digits):
    """The README's table form: the table alone gives the constructor, repr and errors."""
    from gauntlet.workers.hyperparams import integer, real

    model, x, y = digits

    @register_attack
    class Shift(Attack):
        name = "test-shift"
        hyperparams = {"scale": real(1.0, 0.0, 1.0), "tries": integer(10, 1, 1000)}

        def run(self, model, x, y, threat, generator):
            x_adv = (x - self.scale * threat.eps).clamp(0, 1)
            with torch.no_grad():
                return RunOutput(x_adv, model(x_adv).argmax(1) != y)

    try:
        assert repr(build_attack("test-shift", {"tries": 3})) == "Shift(scale=1.0, tries=3)"
        with pytest.raises(GauntletError, match=r"Expected `scale` to be a float in \(0, 1\]"):
            build_attack("test-shift", {"scale": 1.5})
        with pytest.raises(GauntletError, match="accepted parameters: scale, tries"):
            build_attack("test-shift", {"steps": 3})
        with pytest.raises(TypeError, match="unexpected keyword argument 'steps'"):
            Shift(steps=3)
        # A shift by -eps in every pixel is on the ball's boundary: never outside it.
        result = build_attack("test-shift", {"scale": 1.0})(model, x, y, Threat("linf", 0.1))
        gap = (result.x_adv - x).abs().amax()
        assert gap <= 0.1 + 1e-6 and gap > 0.09
    finally:
        del ATTACKS["test-shift"]
