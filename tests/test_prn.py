"""The Perturbation Rectifying Network defense (Akhtar et al. 2018) on the digits CNN.

One ``train`` job (method ``prn``) fits the rectifier and detector; the evaluations with
``defense: prn`` then load that state, and the universal attack is scored on the bare
model, on the defended one with the perturbation crafted on the bare model (the
paper's setting) and through the defense (adaptive).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.suites import load_suite
from gauntlet.scheduler.train import request_training
from gauntlet.workers.attacks import build_attack
from gauntlet.workers.attacks.base import Threat
from gauntlet.workers.datasets import eval_subset, load_split
from gauntlet.workers.defenses import build_defense
from gauntlet.workers.defenses.state import prepare_defense, state_key
from gauntlet.workers.jobs.train import check_train, train_derived
from gauntlet.workers.models import InputSpec, load_classifier
from gauntlet.workers.task import run_spec
from tests.service_helpers import make_app, metric, submit_digits

# Linf 0.3 on digits in [0, 1]: a universal perturbation there takes the bare CNN from
# about 98% to under 20%.
EPS = 0.3
N = 200
# The evaluations' seed: their universal perturbation is fitted with a generator seeded
# by it, far from the seeds of the perturbations prn trains on.
EVAL_SEED = 7
# Fewer crafted perturbations and epochs than the defaults (5, 20), for a test of seconds.
PRN = {"eps": EPS, "perturbations": 3, "epochs": 10}


def _eval(stored, **spec):
    model, store = stored
    base = {
        "dataset": "digits",
        "attack": "universal",
        "params": {},
        "norm": "linf",
        "eps": EPS,
        "n": N,
        "seed": EVAL_SEED,
        "batch_size": 100,
    }
    return run_spec({**base, **spec}, model, artifacts=store, data_root="")


def _train_prn(stored):
    model, store = stored
    spec = {
        "kind": "train",
        "dataset": "digits",
        "attack": "prn",
        "params": {**PRN, "suite": {"name": "prn"}},
        "n": N,
        "seed": 0,
    }
    return run_spec(spec, model, artifacts=store, data_root="")


def test_prn_restores_accuracy_under_a_fresh_non_adaptive_universal_perturbation(stored):
    trained = _train_prn(stored)
    fit = trained.details["fit"]
    sha = trained.details["defense_state"]
    # Measured on the held-out fifth of the training images (269): detector right on 0.996
    # of clean and 1.0 of perturbed ones; under the bank's perturbations bare 0.32,
    # defended 0.90.
    assert fit["detector_clean_accuracy"] > 0.9 and fit["detector_perturbed_accuracy"] > 0.9
    assert fit["defended_perturbed_accuracy"] > fit["bare_perturbed_accuracy"] + 0.3
    assert fit["perturbations"]["linf_norms"] == [EPS] * 8  # 3 crafted + 5 synthetic
    assert metric(trained, "prn_clean_accuracy") > metric(trained, "bare_clean_accuracy") - 0.03

    bare = _eval(stored)
    plain = _eval(stored, defense="prn", defense_params=PRN, adaptive=False)
    adaptive = _eval(stored, defense="prn", defense_params=PRN, adaptive=True)
    # The evaluations found the train job's state instead of fitting their own.
    assert plain.details["defense_state"] == adaptive.details["defense_state"] == sha
    assert adaptive.details["adaptations"] == []  # differentiable: gradients go through it
    assert plain.details["adaptations"] == ["bare-model"]  # crafted on the bare CNN

    clean, bare_robust = metric(bare, "clean_accuracy"), metric(bare, "robust_accuracy")
    # Measured at n=200: clean 0.99 bare and defended; under the universal perturbation
    # 0.165 bare, 0.84 behind prn when crafted on the bare model, 0.165 when crafted
    # through prn (the adaptive attack breaks it again). Over eval seeds 0-7 and prn
    # seeds 0-1 the non-adaptive number stayed in [0.78, 0.96], the bare one in
    # [0.11, 0.19].
    assert bare_robust < 0.5 * clean
    assert abs(metric(plain, "clean_accuracy") - clean) <= 0.03
    assert metric(plain, "robust_accuracy") >= bare_robust + 0.4
    assert metric(adaptive, "robust_accuracy") <= metric(plain, "robust_accuracy")

    # The same perturbation again, by hand: the eval's number is the bare model's on it,
    # and it is none of the perturbations prn was trained on.
    model_row, store = stored
    weights = ArtifactStore(store).get(model_row["weights_sha256"])
    net = load_classifier(weights, "small-cnn", InputSpec.from_dict(model_row["input_spec"]))
    net.eval()
    x_train, y_train = load_split("digits", "train", None)
    attack = build_attack("universal", {})
    threat = Threat("linf", EPS)
    attack.fit(net, x_train, y_train, threat, torch.Generator().manual_seed(EVAL_SEED))
    x, y, _ = eval_subset("digits", N, EVAL_SEED, None)
    with torch.no_grad():
        correct = (net(x).argmax(1) == y) & (net((x + attack.delta).clamp(0, 1)).argmax(1) == y)
    assert int(correct.sum()) == round(bare_robust * N)
    defense = build_defense("prn", PRN, net).eval()
    assert (
        prepare_defense(
            defense,
            dataset="digits",
            model_sha=model_row["weights_sha256"],
            artifacts=store,
            data_root=None,
        )
        == sha
    )
    similarity = F.cosine_similarity(defense.perturbation_bank.flatten(1), attack.delta.flatten(1))
    assert float(similarity.max()) < 0.99  # measured: 0.92

    # Straight-through gate: the value is the hard-gated model's, the gradient is not zero.
    xs = x[:32].clone().requires_grad_(True)
    rectified, gate = defense.gate(xs)
    assert set(gate.detach().tolist()) <= {0.0, 1.0}
    chosen = torch.where(gate.detach().bool().view(-1, 1, 1, 1), rectified, xs)
    torch.testing.assert_close(defense(xs), net(chosen))
    (grad,) = torch.autograd.grad(F.cross_entropy(defense(xs), y[:32]), xs)
    assert grad.abs().sum() > 0


def test_the_prn_suite_and_train_method_share_one_state_key():
    specs = load_suite("prn").expand("m" * 64, "digits", n=200)
    defended = [s for s in specs if s.defense == "prn" and s.attack == "universal"]
    assert sorted(s.adaptive for s in defended) == [False, True]
    (eps,) = {s.eps for s in defended}
    from_suite = build_defense("prn", defended[0].defense_params, None)
    from_train = build_defense("prn", check_train("prn", {"suite": "prn"}), None)
    assert from_suite.eps == eps  # fitted for the budget it is attacked at
    keys = {state_key(d, dataset="digits", model_sha="w") for d in (from_suite, from_train)}
    assert len(keys) == 1


def test_bad_prn_settings_and_state_are_one_clear_error():
    with pytest.raises(GauntletError, match="eps"):
        check_train("prn", {"eps": -1})
    with pytest.raises(GauntletError, match="lr"):
        check_train("prn", {"lr": 0.1})
    with pytest.raises(GauntletError, match="not fitted"):
        build_defense("prn", {}, torch.nn.Identity())(torch.zeros(1, 1, 8, 8))
    with pytest.raises(GauntletError, match="perturbation bank"):
        build_defense("prn", {}, None).load_state_tensors({"stats": torch.zeros(7)})
    with pytest.raises(GauntletError, match="train job"):
        train_derived("prn", {}, None, "small-cnn", None, None, None, 0)


def test_the_prn_train_job_and_defended_evaluations_share_one_fit(tmp_path, digits_models):
    # The service path: `gauntlet train base --method prn` and a suite with `defense: prn`
    # of the same settings. Whichever job runs first fits; the others load that state.
    tiny = {"eps": EPS, "perturbations": 1, "synthetic": 0, "epochs": 2, "train_points": 300}
    suite = tmp_path / "prn.yaml"
    suite.write_text(
        f"n: 50\neps: {{linf: {{default: {EPS}}}}}\n"
        f"defenses: [{{name: prn, params: {json.dumps(tiny)}}}]\n"
        "evaluations:\n  - attack: clean\n"
        "  - {attack: universal, norm: linf, params: {epochs: 3}}\n"
    )
    app = make_app(tmp_path / "home")
    submit_digits(app, digits_models["standard"], suite=str(suite), name="base")
    job_id, new = request_training(app.engine, app.queue, "base", "prn", {**tiny}, n=50)
    assert new
    assert app.dispatcher(LocalExecutor()).run(drain=True).failed == 0
    jobs = [lifecycle.get_job(app.engine, j["id"]) for j in lifecycle.list_jobs(app.engine)]
    assert sorted(j["kind"] for j in jobs) == ["eval", "eval", "eval", "train"]
    states = {j["details"]["defense_state"] for j in jobs}
    assert len(states) == 1  # one fit, under one key
    train = lifecycle.get_job(app.engine, job_id)["details"]
    assert train["settings"] == check_train("prn", tiny)
    assert [m["name"] for m in lifecycle.list_models(app.engine)] == ["base"]  # no derived one
    with pytest.raises(GauntletError, match="synthetic"):
        request_training(app.engine, app.queue, "base", "prn", {"synthetic": -1})
