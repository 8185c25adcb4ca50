"""Every built-in attack's repr, pinned.

The repr goes into each job's key, so changing one silently orphans the results that old
databases hold for it (their jobs would be queued again). A new built-in must add its
line here; a deliberate change must say so in the CHANGELOG.
"""

from __future__ import annotations

import pytest

from gauntlet.workers.attacks import ATTACKS, build_attack

PINNED = {
    "apgd-ce": ({}, "APGDCE(norm=None, steps=100, restarts=1, rho=0.75)"),
    "apgd-dlr": (
        {"norm": "l2", "steps": 20},
        "APGDDLR(norm='l2', steps=20, restarts=1, rho=0.75)",
    ),
    "apgd-t": (
        {},
        "APGDT(norm=None, steps=100, restarts=1, rho=0.75, n_target_classes=9, stack_rows=0, "
        "first_target=1)",
    ),
    "autoattack": (
        {},
        "AutoAttack(version='standard', steps=100, queries=5000, n_target_classes=9)",
    ),
    "autoattack-fast": (
        {},
        "AutoAttackFast(steps=100, queries=500, n_target_classes=9, cheap_targets=4, "
        "fab_targets=2, screen=0.1, probe_queries=100, masked_share=0.5, full_queries=5000)",
    ),
    "bim": ({}, "BIM(norm=None, steps=10, rel_stepsize=0.125, targeted=False, target='random')"),
    "clean": ({}, "Clean()"),
    "cw-l2": (
        {},
        "CarliniWagnerL2(steps=1000, binary_steps=5, initial_const=0.01, lr=0.01, "
        "confidence=0.0, abort_early=True, targeted=False, target='random')",
    ),
    "deepfool": ({}, "DeepFool(norm=None, steps=50, overshoot=0.02, candidates=10)"),
    "dknn-feature-space": (
        {},
        "DkNNFeatureSpace(norm=None, steps=100, rel_stepsize=0.025, guides=75, check_every=10)",
    ),
    "fab-t": (
        {},
        "FABT(norm=None, steps=100, restarts=1, n_target_classes=9, alpha_max=0.1, eta=1.05, "
        "beta=0.9, stack_rows=0)",
    ),
    "fgsm": ({}, "FGSM(norm=None)"),
    "mi-fgsm": (
        {"norm": "linf", "steps": 20},
        "MIFGSM(norm='linf', steps=20, rel_stepsize=0.05, momentum=1.0, targeted=False, "
        "target='random')",
    ),
    "nes": (
        {},
        "NES(samples=50, sigma=0.001, queries=10000, steps=None, rel_stepsize=None, loss='margin')",
    ),
    "patch": ({}, "Patch(size=0.25, fit_points=500, epochs=10, step_size=0.05)"),
    "pgd": (
        {"norm": "linf", "steps": 10, "rel_stepsize": 0.25},
        "PGD(norm='linf', steps=10, rel_stepsize=0.25, restarts=1, random_start=True)",
    ),
    "pgd-targeted": (
        {"target": "next"},
        "PGDTargeted(norm=None, steps=40, rel_stepsize=0.0625, random_start=True, target='next')",
    ),
    "r-fgsm": ({}, "RFGSM(norm=None, rel_alpha=0.5)"),
    "square": ({}, "Square(queries=5000, p_init=0.8, restarts=1, loss='margin')"),
    "universal": ({}, "Universal(fit_points=500, epochs=10, rel_stepsize=0.05)"),
}


def test_every_built_in_attack_is_pinned():
    built_in = {
        name for name, cls in ATTACKS.items() if cls.__module__.startswith("gauntlet.workers.")
    }
    assert {"pgd", "autoattack", "square"} <= built_in  # the filter finds the built-ins
    assert built_in == set(PINNED)


@pytest.mark.parametrize(("name", "params", "text"), [(k, *v) for k, v in PINNED.items()])
def test_repr_is_pinned_and_rebuilds_from_config(name, params, text):
    attack = build_attack(name, params)
    assert repr(attack) == text
    # The stored config rebuilds the same attack (what a worker does with a job's params).
    assert repr(build_attack(name, attack.config())) == text
