"""The AutoAttack ensemble: sequential members, per-example worst case, breakdown."""

from __future__ import annotations

import pytest
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import Threat, build_attack
from gauntlet.workers.datasets import eval_subset
from gauntlet.workers.models import InputSpec, load_classifier

SMALL = {"steps": 10, "queries": 200, "n_target_classes": 3}


@pytest.fixture(scope="module")
def robust_model(digits_models):
    return load_classifier(digits_models["robust"], "small-cnn", InputSpec(1, 8, 8, 10))


def test_ensemble_is_the_worst_case_of_its_members(robust_model):
    x, y, _ = eval_subset("digits", 80, 0, None)
    threat = Threat("linf", 0.2)
    ensemble = build_attack("autoattack", SMALL)
    result = ensemble(robust_model, x, y, threat, generator=torch.Generator().manual_seed(0))
    broken = int((result.clean_correct & ~result.robust).sum())
    assert sum(ensemble.breakdown.values()) == broken > 0
    assert list(ensemble.breakdown) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # Never weaker than its first member alone on the same points and seed.
    first = build_attack("apgd-ce", {"steps": 10})(
        robust_model, x, y, threat, generator=torch.Generator().manual_seed(0)
    )
    assert int(result.robust.sum()) <= int(first.robust.sum())
    # Square, the last member, ran only on points the others left: queries elsewhere are 0.
    assert result.queries is not None and int(result.queries.max()) <= SMALL["queries"]


def test_ensemble_params_are_checked():
    with pytest.raises(GauntletError, match="`version`"):
        build_attack("autoattack", {"version": "deluxe"})
