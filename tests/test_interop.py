"""Model cards, `gauntlet model`, export to RobustBench/CSV/JSON, checkpoint conversion."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.cards import check_card, load_card
from gauntlet.scheduler.executors import LocalExecutor
from gauntlet.scheduler.interop import model_report, write_export
from gauntlet.workers.architectures import build_architecture
from gauntlet.workers.convert import convert_checkpoint, ours_to_robustbench
from gauntlet.workers.models import InputSpec, load_classifier
from tests.service_helpers import make_app, submit_digits

CARD = """
name: Robust digits
authors: A. Author and B. Author
link: https://example.org/paper
venue: NeurIPS 2099
architecture: small-cnn
clean_acc: "97.50"
reported: 61.2
additional_data: false
"""


def test_a_card_is_checked_field_by_field(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(CARD)
    card = load_card(path)
    assert card["clean_acc"] == 97.5 and card["reported"] == 61.2
    with pytest.raises(GauntletError, match="unknown fields reportd"):
        check_card({"reportd": 50})
    with pytest.raises(GauntletError, match="`additional_data` .* true or false"):
        check_card({"additional_data": "no"})
    with pytest.raises(GauntletError, match="`reported` .* between 0 and 100"):
        check_card({"reported": 250})
    with pytest.raises(GauntletError, match="`authors` .* string"):
        check_card({"authors": ["a", "b"]})
    path.write_text("[1, 2]")
    with pytest.raises(GauntletError, match="to be a mapping"):
        load_card(path)


def test_card_report_and_exports(tmp_path, digits_models):
    app = make_app(tmp_path / "home")
    card = load_card(_write(tmp_path / "card.json", json.dumps(
        {"name": "Robust digits", "authors": "A. Author", "reported": 61.2}
    )))  # fmt: skip
    report = submit_digits(app, digits_models["robust"], name="robust", n=40, card=card)
    stats = app.dispatcher(LocalExecutor()).run(drain=True)
    assert stats.failed == 0

    shown = model_report(app.engine, "robust")
    assert shown["model"]["id"] == report.model_id and shown["card"] == card
    assert len(shown["jobs"]) == 4
    pgd = next(j for j in shown["jobs"] if j["attack"] == "pgd" and j["kind"] == "eval")
    assert {"clean_accuracy", "robust_accuracy", "success_rate"} <= set(pgd["metrics"])
    assert pgd["metrics"]["robust_accuracy"]["n"] == 40
    with pytest.raises(GauntletError, match="no model match"):
        model_report(app.engine, "nobody")

    (info_path,) = write_export(app.engine, "robustbench", tmp_path / "rb")
    assert info_path.parent.parts[-2:] == ("digits", "Linf")
    info = json.loads(info_path.read_text())
    fields = ["name", "authors", "link", "venue", "architecture", "dataset", "eps",
              "clean_acc", "reported", "autoattack_acc", "additional_data",
              "number_forward_passes", "unreliable"]  # fmt: skip
    assert set(fields) <= set(info)
    assert info["name"] == "Robust digits" and info["reported"] == "61.20"
    assert info["architecture"] == "small-cnn" and info["eps"] == "0.2"
    assert info["autoattack_acc"] is None  # the quick suite runs no autoattack job
    assert 0 < float(info["clean_acc"]) <= 100 and isinstance(info["unreliable"], bool)

    (csv_path,) = write_export(app.engine, "csv", tmp_path / "flat")
    (row,) = list(csv.DictReader(csv_path.open()))
    (json_path,) = write_export(app.engine, "json", tmp_path / "flat")
    (entry,) = json.loads(json_path.read_text())
    assert row["model"] == entry["model"] == "robust"
    assert float(row["robust_accuracy"]) == pytest.approx(entry["robust_accuracy"])


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("arch", ["wrn-10-2", "preact-resnet18"])
def test_a_robustbench_checkpoint_converts_to_the_same_network(tmp_path, arch):
    spec = InputSpec(3, 32, 32, 10)
    torch.manual_seed(0)
    ours = build_architecture(arch, spec).eval()
    for module in ours.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    theirs = ours_to_robustbench(ours.state_dict(), arch)
    names = set(theirs)
    if arch.startswith("wrn"):
        assert {"block1.layer.0.convShortcut.weight", "bn1.weight", "fc.weight"} <= names
    else:
        assert {"layer2.0.shortcut.0.weight", "bn.weight", "linear.weight"} <= names
    checkpoint = tmp_path / "model.pt"
    # DataParallel's prefix inside the usual container, beside optimiser state.
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in theirs.items()}, "epoch": 99}, checkpoint
    )
    out, renamed = convert_checkpoint(checkpoint, arch, tmp_path / "model.safetensors")
    assert renamed
    model = load_classifier(out, arch, InputSpec(3, 32, 32, 10))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)


def test_conversion_refuses_what_is_not_a_state_dict(tmp_path):
    checkpoint = tmp_path / "bad.pt"
    torch.save({"epoch": 3}, checkpoint)
    with pytest.raises(GauntletError, match="holds no state dict"):
        convert_checkpoint(checkpoint, "small-cnn")
    torch.save({"w": torch.zeros(3)}, checkpoint)
    with pytest.raises(GauntletError, match="missing keys"):
        convert_checkpoint(checkpoint, "small-cnn")
