"""Models as researchers hold them: timm architectures, ONNX graphs."""

from __future__ import annotations

import pytest
import torch

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler import lifecycle
from gauntlet.scheduler.boards.leaderboard import leaderboard
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.submit import submit
from gauntlet.workers.architectures import build_architecture
from gauntlet.workers.models import InputSpec, load_classifier, save_classifier
from tests.service_helpers import make_app, submit_digits

FGSM_SUITE = "n: 100\neps: {linf: {default: 0.2}}\nevaluations:\n  - {attack: fgsm, norm: linf}\n"


def _export(net: torch.nn.Module, path, shape=(1, 1, 8, 8)) -> None:
    torch.onnx.export(
        net.eval(),
        (torch.zeros(shape),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )


def test_a_timm_model_is_submitted_and_loads_from_its_safetensors(tmp_path):
    spec = InputSpec(3, 32, 32, 10)
    net = build_architecture("timm:resnet10t", spec)
    weights = tmp_path / "resnet10t.safetensors"
    save_classifier(net, weights)
    app = make_app(tmp_path / "home")
    report = submit(
        app.settings, app.engine, app.queue, weights,
        arch="timm:resnet10t", dataset="cifar10", suite="quick", n=10,
    )  # fmt: skip
    (row,) = [m for m in lifecycle.list_models(app.engine) if m["id"] == report.model_id]
    assert row["arch"] == "timm:resnet10t"
    stored = ArtifactStore(app.settings.artifacts).get(row["weights_sha256"])
    model = load_classifier(stored, row["arch"], InputSpec.from_dict(row["input_spec"]))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = net.eval()((x - model.mean) / model.std)
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_timm_models_are_capped_and_must_exist(tmp_path):
    app = make_app(tmp_path / "home", GAUNTLET_MAX_PARAMETERS=1000)
    weights = tmp_path / "w.safetensors"
    save_classifier(build_architecture("timm:resnet10t", InputSpec(3, 32, 32, 10)), weights)
    with pytest.raises(GauntletError, match="above the cap of 1,000"):
        submit(app.settings, app.engine, app.queue, weights,
               arch="timm:resnet10t", dataset="cifar10", suite="quick")  # fmt: skip
    with pytest.raises(GauntletError, match="unknown timm model 'no-such-net'"):
        submit(app.settings, app.engine, app.queue, weights,
               arch="timm:no-such-net", dataset="cifar10", suite="quick")  # fmt: skip


def test_an_onnx_submission_scores_as_its_safetensors_twin(tmp_path, digits_models):
    app = make_app(tmp_path / "home")
    suite = tmp_path / "fgsm.yaml"
    suite.write_text(FGSM_SUITE)
    source = digits_models["robust"]
    net = load_classifier(source, "small-cnn", InputSpec(1, 8, 8, 10)).net
    graph = tmp_path / "robust.onnx"
    _export(net, graph)
    onnx_report = submit(
        app.settings, app.engine, app.queue, graph,
        arch=None, dataset="digits", suite=str(suite), name="as-onnx",
    )  # fmt: skip
    submit_digits(app, source, suite=str(suite), name="as-safetensors")
    (row,) = [m for m in lifecycle.list_models(app.engine) if m["id"] == onnx_report.model_id]
    assert row["arch"] == "onnx"
    # The graph itself is what the store holds and what the worker converts.
    assert ArtifactStore(app.settings.artifacts).get(row["weights_sha256"]).read_bytes() == (
        graph.read_bytes()
    )
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert (stats.done, stats.failed) == (2, 0)
    robust = {e.model: e.robust_accuracy for e in leaderboard(app.engine, dataset="digits")}
    assert 0 < robust["as-safetensors"] < 1
    assert robust["as-onnx"] == pytest.approx(robust["as-safetensors"], abs=0.01)


class _Wavy(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x.flatten(1))[:, :10]


def test_an_onnx_graph_with_an_operator_off_the_list_is_refused(tmp_path):
    graph = tmp_path / "wavy.onnx"
    _export(_Wavy(), graph)
    app = make_app(tmp_path / "home")
    with pytest.raises(GauntletError, match="operator 'Sin' .* is not accepted"):
        submit(app.settings, app.engine, app.queue, graph,
               arch=None, dataset="digits", suite="quick")  # fmt: skip
    assert lifecycle.list_models(app.engine) == []


def test_an_onnx_graph_above_the_parameter_cap_is_refused(tmp_path, digits_models):
    net = load_classifier(digits_models["standard"], "small-cnn", InputSpec(1, 8, 8, 10)).net
    graph = tmp_path / "big.onnx"
    _export(net, graph)
    app = make_app(tmp_path / "home", GAUNTLET_MAX_PARAMETERS=1000)
    with pytest.raises(GauntletError, match="above the cap of 1,000"):
        submit(app.settings, app.engine, app.queue, graph,
               arch=None, dataset="digits", suite="quick")  # fmt: skip
