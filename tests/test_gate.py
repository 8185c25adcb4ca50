"""The submission gate: checks on a small probe before a model's other jobs run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.nightly import nightly
from gauntlet.scheduler.submit import submit
from gauntlet.workers.architectures import SmallCNN, register_architecture
from gauntlet.workers.datasets import eval_subset
from gauntlet.workers.jobs.gate import CLAIM_TOLERANCE, probe
from gauntlet.workers.models import InputSpec, load_classifier
from tests.service_helpers import make_app


@register_architecture("test-softmax-cnn")
def _softmax_cnn(spec: InputSpec):
    """small-cnn's weights, returning probabilities: the mistake the gate must catch."""
    net = SmallCNN(spec)
    net.register_forward_hook(lambda _m, _i, out: out.softmax(dim=1))
    return net


@register_architecture("test-dropout-cnn")
def _dropout_cnn(spec: InputSpec):
    """small-cnn with dropout that stays on in eval mode: two passes differ."""
    net = SmallCNN(spec)
    net.register_forward_pre_hook(lambda _m, args: (F.dropout(args[0], 0.3, training=True),))
    return net


@register_architecture("test-tiny-gradient-cnn")
def _tiny_gradient_cnn(spec: InputSpec):
    """small-cnn's outputs exactly, with input gradients scaled down by 1e-9."""
    net = SmallCNN(spec)
    net.register_forward_pre_hook(
        lambda _m, args: (args[0].detach() + 1e-9 * (args[0] - args[0].detach()),)
    )
    return net


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out (the reference for the claim rule)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.fixture
def probe_data():
    x, y, _ = eval_subset("digits", 64, 0, "")
    return x, y


def _load(weights, arch: str):
    return load_classifier(weights, arch, InputSpec(1, 8, 8, 10))


def test_probe_checks_on_real_models(digits_models, probe_data):
    x, y = probe_data
    good = probe(_load(digits_models["standard"], "small-cnn"), x, y)
    assert good.passed and good.flags == []
    soft = probe(_load(digits_models["standard"], "test-softmax-cnn"), x, y)
    assert [f for f in soft.failures if "probabilities" in f] and len(soft.failures) == 1
    torch.manual_seed(0)
    dropout = _load(digits_models["standard"], "test-dropout-cnn")
    random = probe(dropout, x, y)
    assert len(random.failures) == 1 and "two forward passes" in random.failures[0]
    assert probe(dropout, x, y, randomized=True).passed  # declared: no determinism check
    tiny = probe(_load(digits_models["standard"], "test-tiny-gradient-cnn"), x, y)
    assert tiny.passed and len(tiny.flags) == 1 and "tiny" in tiny.flags[0]  # a flag only
    assert torch.equal(tiny.correct, good.correct)


def test_claim_rule_follows_the_probe_interval(digits_models, probe_data):
    x, y = probe_data
    model = _load(digits_models["standard"], "small-cnn")
    with torch.no_grad():
        k = int((model(x).argmax(1) == y).sum())
    low, high = _wilson(k, len(y))
    assert probe(model, x, y, claimed=100 * k / len(y)).passed
    # Just inside and just outside 3 points beyond the interval, on both sides.
    for edge, outward in ((low - CLAIM_TOLERANCE, -1), (high + CLAIM_TOLERANCE, 1)):
        inside, outside = edge - outward * 0.002, edge + outward * 0.002
        if 0 <= inside <= 1:
            assert probe(model, x, y, claimed=100 * inside).passed
        if 0 <= outside <= 1:
            (failure,) = probe(model, x, y, claimed=100 * outside).failures
            assert "on the 64-point probe" in failure and "points outside it" in failure


def _suite(tmp_path) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(
        "n: 40\neps: {linf: {default: 0.2}}\nevaluations:\n"
        "  - attack: clean\n  - {attack: fgsm, norm: linf}\n"
    )
    return str(path)


def _submit(app, weights, suite: str, name: str, arch: str = "small-cnn", card=None):
    return submit(
        app.settings,
        app.engine,
        app.queue,
        weights,
        arch=arch,
        dataset="digits",
        suite=suite,
        name=name,
        card=card,
    )


def _variant(weights, path):
    """The same network, one bias nudged by 1e-6: another file, so another model."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["fc2.bias"] = tensors["fc2.bias"] + 1e-6
    save_file(tensors, path)
    return path


def _jobs(app) -> dict[str, list[dict]]:
    jobs: dict[str, list[dict]] = {}
    for job in lifecycle.list_jobs(app.engine, limit=None):
        jobs.setdefault(job["model"], []).append(job)
    return jobs


def test_gate_runs_first_and_stops_bad_submissions(tmp_path, digits_models, stack):
    app = make_app(tmp_path / "home", **stack, GAUNTLET_GATE=1)
    suite = _suite(tmp_path)
    weights = digits_models["standard"]
    report = _submit(app, weights, suite, "good")
    assert report.new_jobs == 1  # the gate alone: the suite waits for its verdict
    _submit(app, weights, suite, "soft", "test-softmax-cnn")
    _submit(app, weights, suite, "noisy", "test-dropout-cnn")
    tiny = _variant(weights, tmp_path / "tiny.safetensors")
    _submit(app, tiny, suite, "tiny", "test-tiny-gradient-cnn")
    declared = _variant(tiny, tmp_path / "declared.safetensors")
    _submit(app, declared, suite, "declared", "test-dropout-cnn", card={"randomized": True})
    # The right network, with a claim far from what it measures.
    _submit(app, digits_models["robust"], suite, "claims", card={"clean_acc": 50.0})
    assert {j["kind"] for j in lifecycle.list_jobs(app.engine, limit=None)} == {"gate"}
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    jobs = _jobs(app)
    status = lambda j: str(getattr(j["status"], "value", j["status"]))  # noqa: E731
    for name in ("good", "declared", "tiny"):
        assert sorted(j["attack"] for j in jobs[name]) == ["clean", "fgsm", "submission"]
        assert {status(j) for j in jobs[name]} == {"done"}
    for name, reason in (("soft", "probabilities"), ("noisy", "two forward passes")):
        (gate,) = [j for j in jobs[name] if j["kind"] == "gate"]
        assert status(gate) == "failed" and reason in gate["error"]
        others = [j for j in jobs[name] if j["kind"] != "gate"]
        assert sorted(j["attack"] for j in others) == ["clean", "fgsm"]
        # Stopped, not run: never claimed, the gate's reason stored on each.
        assert all(status(j) == "failed" and j["attempts"] == 0 for j in others)
        assert all(reason in j["error"] and "submission gate" in j["error"] for j in others)
    # A flag-only finding is kept on the gate, and the model's jobs ran anyway.
    (gate,) = [j for j in jobs["tiny"] if j["kind"] == "gate"]
    assert "tiny" in lifecycle.get_job(app.engine, gate["id"])["details"]["gate"]["flags"][0]
    (gate,) = [j for j in jobs["claims"] if j["kind"] == "gate"]
    assert status(gate) == "failed" and "claimed 50%" in gate["error"]
    assert all(status(j) == "failed" for j in jobs["claims"])
    # Two gates and two suites of two done; three gates failed, with their reasons.
    assert (stats.done, stats.failed) == (3 + 3 * 2, 3)
    # The claim withdrawn: a new gate passes and releases the jobs the old one stopped.
    _submit(app, digits_models["robust"], suite, "claims")
    app.dispatcher(LocalExecutor()).run(drain=True)
    claims = [j for j in _jobs(app)["claims"] if j["kind"] != "gate"]
    assert sorted(j["attack"] for j in claims) == ["clean", "fgsm"]
    assert {status(j) for j in claims} == {"done"}
    # Nightly re-expands nothing: no gated suite at the probe's n, no stopped model.
    report = nightly(app.engine, app.queue, app.redis, prefix=app.settings.redis_prefix)
    assert (report.new_jobs, report.skipped) == (0, {})
    assert report.models == 4  # good, tiny, declared, claims; not soft or noisy
