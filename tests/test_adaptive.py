"""Defenses, adaptive evaluation (BPDA, EOT), reliability flags, curves and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scheduler.leaderboard import _masking_flags
from tests.service_helpers import metric as _metric
from tests.service_helpers import run_eval
from workers import outcomes
from workers.adaptive import BPDA, EOT, attack_surface
from workers.defenses import build_defense
from workers.evaluate import evaluate

N = 64


def _run(stored, **spec):
    return run_eval(stored, n=N, **spec)


@pytest.mark.parametrize("defense", ["jpeg", "bit-depth"])
def test_bpda_breaks_a_non_differentiable_defense_that_plain_pgd_cannot(stored, defense):
    plain = _run(stored, defense=defense, adaptive=False)
    bpda = _run(stored, defense=defense, adaptive=True)
    clean = _metric(plain, "clean_accuracy")
    assert clean > 0.85
    # Plain PGD sees zero gradients: the defense looks robust, and the job says why not.
    assert _metric(plain, "robust_accuracy") > 0.8 * clean
    assert any("gradients are zero" in f for f in plain.details["flags"])
    assert plain.details["adaptations"] == []
    # Through BPDA the same defense loses most of its apparent robustness.
    assert bpda.details["adaptations"] == ["bpda"]
    assert not any("gradients" in f for f in bpda.details["flags"])
    assert _metric(bpda, "robust_accuracy") < _metric(plain, "robust_accuracy") - 0.4


def test_eot_attacks_a_randomized_defense(stored):
    params = {"sigma": 0.15}
    plain = _run(stored, defense="gaussian-noise", defense_params=params, adaptive=False, eps=0.1)
    eot = _run(
        stored,
        defense="gaussian-noise",
        defense_params=params,
        adaptive=True,
        eot_samples=8,
        eps=0.1,
    )
    assert _metric(plain, "clean_accuracy") > 0.8  # the defense keeps the model usable
    assert any("randomized output" in f for f in plain.details["flags"])
    assert eot.details["adaptations"] == ["eot-8"]
    # Gradients of single random draws point in noisy directions; their expectation
    # does not: EOT is the stronger attack.
    assert _metric(eot, "robust_accuracy") < _metric(plain, "robust_accuracy")


def test_bpda_and_eot_wrappers():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    jpeg = build_defense("jpeg", {"quality": 50}, net)
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    surface, used = attack_surface(jpeg, adaptive=True)
    assert isinstance(surface, BPDA) and used == ["bpda"]
    # BPDA: the defended output, and the gradient of the model at the transformed point.
    assert torch.allclose(surface(x), jpeg(x), atol=1e-6)
    (g,) = torch.autograd.grad(surface(x)[:, 0].sum(), x)
    assert torch.allclose(g, net[1].weight[0].view(1, 1, 8, 8).expand_as(g))
    rrp = build_defense("random-resize-pad", {}, net)
    surface, used = attack_surface(rrp, adaptive=True, eot_samples=4)
    assert isinstance(surface, EOT) and used == ["eot-4"]
    assert attack_surface(net, adaptive=True) == (net, [])


def test_curve_goes_to_zero_on_the_bare_model_and_flags_a_masked_one(stored):
    bare = _run(stored, eps_sweep=[0.05, 0.2, 0.6])
    curve = bare.details["curve"]["robust_accuracy"]
    assert curve == sorted(curve, reverse=True) and curve[-1] == 0.0
    assert [m.name for m in bare.metrics if "@" in m.name] == [
        "robust_accuracy@0.05",
        "robust_accuracy@0.2",
        "robust_accuracy@0.6",
    ]
    assert not any("should go to zero" in f for f in bare.details["flags"])
    masked = _run(stored, defense="bit-depth", adaptive=False, eps_sweep=[0.2, 0.6])
    assert any("should go to zero" in f for f in masked.details["flags"])


def test_an_interrupted_job_resumes_from_its_saved_state(stored, tmp_path):
    model, store = stored
    spec = {
        "dataset": "digits",
        "attack": "pgd",
        "params": {"steps": 10},
        "norm": "linf",
        "eps": 0.1,
        "n": N,
        "seed": 0,
        "batch_size": 16,
    }
    whole = evaluate(spec, model, artifacts=store, data_root="")
    seen = []

    def dies_after_two_chunks(done, total):
        seen.append(done)
        if len(seen) == 2:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError):
        evaluate(
            spec,
            model,
            artifacts=store,
            data_root="",
            progress=dies_after_two_chunks,
            checkpoint_name="job-7",
        )
    resumed = []
    again = evaluate(
        spec,
        model,
        artifacts=store,
        data_root="",
        progress=lambda d, t: resumed.append(d),
        checkpoint_name="job-7",
    )
    assert resumed == [48, 64]  # chunks 1-2 were not attacked again
    assert (again.clean, again.robust) == (whole.clean, whole.robust)
    assert not (tmp_path / "artifacts" / "checkpoints" / "job-7.safetensors").exists()


def test_black_box_beating_white_box_is_flagged():
    clean = np.ones(10, dtype=bool)
    robust = {"pgd": np.array([1] * 8 + [0] * 2, bool), "square": np.array([1] * 5 + [0] * 5, bool)}
    assert "square beats every white-box attack" in _masking_flags(clean, robust)[0]
    robust["apgd-ce"] = np.array([1] * 4 + [0] * 6, bool)
    assert _masking_flags(clean, robust) == []


def test_outcomes_of_a_defended_job_are_judged_on_the_defended_model(stored):
    result = _run(stored, defense="bit-depth", adaptive=True)
    clean = outcomes.unpack(result.clean, N)
    robust = outcomes.unpack(result.robust, N)
    assert not (robust & ~clean).any()
