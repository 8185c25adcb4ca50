"""APGD-CE, APGD-DLR, APGD-T and FAB-T: closed forms, invariants, and torchattacks (a port
of the AutoAttack reference code) as an independent reference.

Robust accuracies are compared on the FGSM-trained digits CNN at eps where they lie
clearly between 0 and 1; ours must be at least as strong, within one point.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import Threat, build_attack, validate_attack
from gauntlet.workers.attacks.apgd import apgd_restart, checkpoint_hundredths, checkpoints
from gauntlet.workers.attacks.fab import box_hyperplane_projection
from gauntlet.workers.attacks.losses import cross_entropy, dlr, targeted_dlr
from gauntlet.workers.attacks.norms import get_norm

torchattacks = pytest.importorskip("torchattacks")

N_POINTS = 200
TOLERANCE = 0.01  # one point of robust accuracy


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Run these small-batch attacks on one thread: on shared, busy cores, intra-op
    threads contend and made this module ~6x slower (a throughput knob, not a result)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def robust_model(digits_models):
    from gauntlet.workers.models import InputSpec, load_classifier

    return load_classifier(digits_models["robust"], "small-cnn", InputSpec(1, 8, 8, 10)).eval()


@pytest.fixture(scope="module")
def data():
    from gauntlet.workers.datasets import eval_subset

    x, y, _ = eval_subset("digits", N_POINTS, 0, None)
    return x, y


def ours(name: str, model, x, y, threat: Threat, **params) -> float:
    result = build_attack(name, params)(model, x, y, threat, generator=seeded(0))
    return result.robust.float().mean().item()


def theirs(attack, model, x, y) -> float:
    with torch.no_grad():
        return (model(attack(x, y)).argmax(dim=1) == y).float().mean().item()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the step-size schedule -------------------------------------------------------------


def test_checkpoints_follow_the_closed_form():
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1 + 1e-9:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert [h / 100 for h in checkpoint_hundredths()] == pytest.approx(p[1:])
    assert checkpoint_hundredths()[:3] == [22, 41, 57]
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for steps in (5, 20, 37, 50, 1000):
        expected = sorted({math.ceil(q * steps - 1e-9) for q in p[1:]})
        assert checkpoints(steps) == expected


def test_step_size_halves_only_at_checkpoints(robust_model, data):
    x, y = data[0][:100], data[1][:100]
    steps, eps = 30, 0.2
    log: dict[int, dict[int, float]] = {}

    def on_step(done: int, idx: torch.Tensor, eta: torch.Tensor) -> None:
        log[done] = dict(zip(idx.tolist(), eta.tolist(), strict=True))

    idx = torch.arange(len(x))
    apgd_restart(
        robust_model, lambda z, t, _: cross_entropy(z, t), x, y, idx, get_norm("linf"), eps,
        steps=steps, rho=0.75, generator=seeded(0), x_adv=x.clone(),
        fooled=torch.zeros(len(x), dtype=torch.bool), active_per_step=[], on_step=on_step,
    )  # fmt: skip
    marks = set(checkpoints(steps))
    previous = dict.fromkeys(range(len(x)), 2 * eps)
    halvings = 0
    for done in sorted(log):
        for i, eta in log[done].items():
            if done in marks:
                assert eta in (pytest.approx(previous[i]), pytest.approx(previous[i] / 2))
                halvings += eta < previous[i] * 0.75
            else:
                assert eta == pytest.approx(previous[i]), f"step size changed at step {done}"
        previous = log[done]
    assert halvings > 0  # the robust model stalls the attack somewhere


# --- losses -------------------------------------------------------------------------------


def test_dlr_by_hand():
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    # Sorted: 3, 2, 1, 0 -> z_pi1 - z_pi3 = 3 - 1 = 2.
    # y = 0: -(1 - 3) / 2 = 1;  y = 1 (the top class): -(3 - 2) / 2 = -0.5.
    assert dlr(z, torch.tensor([0, 1])).tolist() == pytest.approx([1.0, -0.5])
    # Shift and scale invariant, unlike cross-entropy.
    assert dlr(7 * z - 3, torch.tensor([0, 1])).tolist() == pytest.approx([1.0, -0.5])
    # Targeted, y = 1, t = 2: -(3 - 2) / (3 - (1 + 0) / 2) = -0.4.
    z5 = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    assert targeted_dlr(z5, torch.tensor([1]), torch.tensor([2])).item() == pytest.approx(-0.4)
    with pytest.raises(GauntletError, match="at least 3 classes"):
        dlr(torch.zeros(1, 2), torch.tensor([0]))


# --- against torchattacks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "loss,norm,eps",
    [("ce", "linf", 0.2), ("dlr", "linf", 0.2), ("ce", "l2", 1.0), ("dlr", "l2", 1.0)],
)
def test_apgd_matches_torchattacks(robust_model, data, loss, norm, eps):
    x, y = data
    mine = ours(f"apgd-{loss}", robust_model, x, y, Threat(norm, eps), steps=50)
    ref_norm = {"linf": "Linf", "l2": "L2"}[norm]
    reference = torchattacks.APGD(
        robust_model, norm=ref_norm, eps=eps, steps=50, n_restarts=1, loss=loss, seed=0
    )
    ref = theirs(reference, robust_model, x, y)
    assert 0.05 < ref < 0.6  # a comparison where both could be wrong either way
    assert mine <= ref + TOLERANCE


def test_apgd_t_matches_torchattacks(robust_model, data):
    x, y = data[0][:150], data[1][:150]
    mine = ours("apgd-t", robust_model, x, y, Threat("linf", 0.2), steps=25)
    reference = torchattacks.APGDT(
        robust_model, norm="Linf", eps=0.2, steps=25, n_restarts=1, seed=0, n_classes=10
    )
    ref = theirs(reference, robust_model, x, y)
    assert 0.05 < ref < 0.6
    assert mine <= ref + TOLERANCE


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
def test_fab_t_matches_torchattacks(robust_model, data, norm, eps):
    x, y = data[0][:150], data[1][:150]
    mine = ours("fab-t", robust_model, x, y, Threat(norm, eps), steps=25)
    ref_norm = {"linf": "Linf", "l2": "L2"}[norm]
    reference = torchattacks.FAB(
        robust_model, norm=ref_norm, eps=eps, steps=25, n_restarts=1, seed=0,
        multi_targeted=True, n_classes=10,
    )  # fmt: skip
    ref = theirs(reference, robust_model, x, y)
    assert 0.05 < ref < 0.6
    assert mine <= ref + TOLERANCE


def test_apgd_at_least_as_strong_as_pgd(robust_model, data):
    x, y = data
    threat = Threat("linf", 0.2)
    # APGD's `steps` counts updates after the gradient at the start: steps + 1 gradients.
    apgd = ours("apgd-ce", robust_model, x, y, threat, steps=50)
    pgd = ours("pgd", robust_model, x, y, threat, steps=51)
    assert apgd <= pgd + 0.005


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_box_hyperplane_projection_is_minimal(norm):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(12, 5, generator=g, dtype=torch.float64)
    w = torch.randn(12, 5, generator=g, dtype=torch.float64)
    b = (w * torch.rand(12, 5, generator=g, dtype=torch.float64)).sum(dim=1)
    d = box_hyperplane_projection(t, w, b, norm)
    assert ((t + d) >= 0).all() and ((t + d) <= 1).all()
    assert (w * (t + d)).sum(dim=1).tolist() == pytest.approx(b.tolist())
    for i in range(len(t)):
        ti, wi, bi = t[i].numpy(), w[i].numpy(), b[i].item()
        # minimise the norm; Linf as max|d| over the box with the plane, via SLSQP on an
        # epigraph variable s >= |d_j|.
        if norm == "l2":
            objective, start = (lambda v: v[:5] @ v[:5]), [0.0] * 5 + [0.0]
            extra = []
        else:
            objective, start = (lambda v: v[5]), [0.0] * 5 + [1.0]
            extra = [{"type": "ineq", "fun": lambda v, j=j, s=s: v[5] - s * v[j]}
                     for j in range(5) for s in (1, -1)]  # fmt: skip
        plane = {"type": "eq", "fun": lambda v, wi=wi, ti=ti, bi=bi: wi @ (ti + v[:5]) - bi}
        bounds = [(-ti[j], 1 - ti[j]) for j in range(5)] + [(0, None)]
        res = scipy_optimize.minimize(
            objective, start, method="SLSQP", bounds=bounds, constraints=[plane, *extra],
            options={"ftol": 1e-12, "maxiter": 500},
        )  # fmt: skip
        best = math.sqrt(res.fun) if norm == "l2" else res.fun
        mine = d[i].norm().item() if norm == "l2" else d[i].abs().max().item()
        assert mine == pytest.approx(best, abs=1e-5)


# --- the contract -------------------------------------------------------------------------

ALL = ["apgd-ce", "apgd-dlr", "apgd-t", "fab-t"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
def test_in_ball_box_and_fooled_for_real(robust_model, data, name, norm, eps):
    x, y = data[0][:60], data[1][:60]
    params = (
        {"steps": 10} if name in ("apgd-ce", "apgd-dlr") else {"steps": 5, "n_target_classes": 2}
    )
    result = build_attack(name, params)(robust_model, x, y, Threat(norm, eps), generator=seeded(1))
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (get_norm(norm).distance(result.x_adv, x) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        wrong = robust_model(result.x_adv).argmax(dim=1) != y
    fooled = result.clean_correct & ~result.robust
    assert fooled.any() and result.robust.any()
    assert (wrong[fooled]).all()  # a success is a misclassified point inside the ball
    assert result.active_per_step[0] == result.clean_correct.sum().item()
    if name in ("apgd-ce", "apgd-dlr"):
        # One run: fooled points leave at the forward pass that shows them fooled.
        steps = result.active_per_step
        assert steps == sorted(steps, reverse=True) and steps[-1] < steps[0]
    assert sum(result.active_per_step) == result.grad_evals


@pytest.mark.parametrize(
    "name,first,second,per_run",
    [
        ("apgd-ce", {"restarts": 1}, {"restarts": 2}, 11),
        ("apgd-t", {"n_target_classes": 1}, {"n_target_classes": 2}, 11),
        ("fab-t", {"n_target_classes": 1}, {"n_target_classes": 2}, 10),
    ],
)
def test_later_runs_attack_only_points_still_robust(
    robust_model, data, name, first, second, per_run
):
    x, y = data[0][:80], data[1][:80]
    threat = Threat("linf", 0.2)
    one = build_attack(name, {"steps": 10, **first})(
        robust_model, x, y, threat, generator=seeded(2)
    )
    two = build_attack(name, {"steps": 10, **second})(
        robust_model, x, y, threat, generator=seeded(2)
    )
    assert len(one.active_per_step) == per_run  # some point survived the whole first run
    assert two.active_per_step[:per_run] == one.active_per_step
    assert two.active_per_step[per_run] == one.robust.sum().item()
    assert two.robust.sum() <= one.robust.sum()


def test_first_target_skips_the_likeliest_classes(robust_model, data):
    x, y = data[0][:40], data[1][:40]
    threat, stacked = Threat("linf", 0.2), {"steps": 5, "stack_rows": 10_000}
    clean = int((robust_model(x).argmax(1) == y).sum())
    # All targets stacked in one batch: its rows are points x targets attacked.
    for first, last, targets in [(1, 9, 9), (5, 9, 5), (3, 4, 2), (9, 9, 1)]:
        attack = build_attack(
            "apgd-t", {**stacked, "first_target": first, "n_target_classes": last}
        )
        result = attack(robust_model, x, y, threat, generator=seeded(0))
        assert result.active_per_step[0] == clean * targets, (first, last)
    # Against only the 9th likeliest class, a one-off run is weaker than all nine.
    only_last = ours("apgd-t", robust_model, x, y, threat, steps=10, first_target=9)
    every = ours("apgd-t", robust_model, x, y, threat, steps=10)
    assert only_last > every


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("apgd-ce", {"steps": 0}, r"`steps` to be an integer \[1, 10000\], but got 0"),
        ("apgd-t", {"first_target": 4, "n_target_classes": 3}, "`first_target` at most"),
        ("apgd-ce", {"restarts": 1.5}, "`restarts`"),
        ("apgd-dlr", {"rho": 0.0}, "`rho`"),
        ("apgd-dlr", {"norm": "l1"}, "`norm`"),
        ("apgd-t", {"n_target_classes": 0}, "`n_target_classes`"),
        ("apgd-t", {"loss": "ce"}, "Unknown parameter"),
        ("fab-t", {"alpha_max": 2.0}, "`alpha_max`"),
        ("fab-t", {"eta": 0.9}, "`eta`"),
        ("fab-t", {"beta": True}, "`beta`"),
    ],
)
def test_bad_params_raise(name, params, match):
    with pytest.raises(GauntletError, match=match):
        build_attack(name, params)


def test_norm_mismatch_and_too_few_classes():
    with pytest.raises(GauntletError, match="linf norm, but the threat is l2"):
        validate_attack("fab-t", {"norm": "linf"}, Threat("l2", 1.0))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    y = model(x).argmax(dim=1).detach()  # correctly classified, so they are attacked
    with pytest.raises(GauntletError, match="at least 4 classes"):
        build_attack("apgd-t", {"steps": 2})(model, x, y, Threat("linf", 0.1))
