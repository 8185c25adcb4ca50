"""Model loading: architecture registry, input spec, safetensors checks, Normalized."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import architectures
from gauntlet.workers.architectures import (
    architecture_names,
    build_architecture,
    check_architecture,
    register_architecture,
)
from gauntlet.workers.batches import eval_mode, predict_in_batches
from gauntlet.workers.models import (
    InputSpec,
    Normalized,
    check_safetensors,
    load_classifier,
    save_classifier,
)

DIGITS = InputSpec(channels=1, height=8, width=8, num_classes=10)


class _Evil:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    net = build_architecture("small-cnn", DIGITS)
    path = tmp_path / "model.safetensors"
    save_classifier(net, path)
    return net, path


# --- architectures ---


@pytest.mark.parametrize(
    "arch, spec",
    [
        ("small-cnn", DIGITS),
        ("small-cnn", InputSpec(1, 28, 28, 10)),
        ("preact-resnet18", InputSpec(3, 32, 32, 10)),
        ("wrn-16-2", InputSpec(3, 32, 32, 100)),
        ("torchvision:resnet18", InputSpec(3, 32, 32, 10)),
    ],
)
def test_builtin_architectures_give_logits(arch, spec):
    net = build_architecture(arch, spec).eval()
    with torch.no_grad():
        out = net(torch.rand(2, spec.channels, spec.height, spec.width))
    assert out.shape == (2, spec.num_classes)


def test_registry_names_and_errors():
    assert {"small-cnn", "preact-resnet18", "wrn-28-10"} <= set(architecture_names())
    with pytest.raises(GauntletError) as err:
        build_architecture("resnet-9000", DIGITS)
    assert "resnet-9000" in str(err.value)
    for name in ("small-cnn", "preact-resnet18", "wrn-28-10", "torchvision:"):
        assert name in str(err.value)
    check_architecture("wrn-40-4")
    for bad in (
        "wrn-15-2",
        "wrn-16-0",
        "torchvision:not_a_model",
        "torchvision:fasterrcnn_resnet50_fpn",
    ):
        with pytest.raises(GauntletError):
            check_architecture(bad)
    with pytest.raises(GauntletError, match="3-channel"):
        build_architecture("torchvision:resnet18", InputSpec(1, 32, 32, 10))
    with pytest.raises(GauntletError, match="8x8"):
        build_architecture("small-cnn", InputSpec(1, 4, 4, 10))


@pytest.fixture
def scratch_architectures(monkeypatch):
    """Architectures a test registers are gone after it: the registry's storage is a copy."""
    registry = architectures.ARCHITECTURES
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    return registry


def test_third_party_registration(scratch_architectures):
    @register_architecture("tiny-linear")
    def tiny(spec):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(spec.channels * spec.height * spec.width, spec.num_classes)
        )

    assert "tiny-linear" in architecture_names()
    assert scratch_architectures["tiny-linear"] is tiny  # on the shared registry
    assert build_architecture("tiny-linear", DIGITS)(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(GauntletError, match="already registered"):
        register_architecture("tiny-linear")(lambda spec: nn.Identity())
    with pytest.raises(GauntletError, match="reserved"):
        register_architecture("torchvision:mine")


# --- input spec and Normalized ---


def test_input_spec_round_trip_and_validation():
    spec = InputSpec(3, 32, 32, 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25))
    again = InputSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and hash(again) == hash(spec)
    with pytest.raises(GauntletError, match=r"Expected `channels` to be a positive int, but got 0"):
        InputSpec.from_dict({"channels": 0, "height": 8, "width": 8, "num_classes": 10})
    bad = [
        {"channels": 3, "height": 8, "width": 8},  # missing num_classes
        {"channels": 3, "height": 8, "width": 8, "num_classes": 10, "colour": 1},
        {"channels": 3, "height": 8, "width": 8, "num_classes": 10, "mean": [0.1, 0.2]},
        {"channels": 1, "height": 8, "width": 8, "num_classes": 10, "std": [0.0]},
        {"channels": 1, "height": 8.5, "width": 8, "num_classes": 10},
        {"channels": 1, "height": 8, "width": 8, "num_classes": 1},
    ]
    for d in bad:
        with pytest.raises(GauntletError):
            InputSpec.from_dict(d)


def test_normalized_matches_manual_computation():
    spec = InputSpec(3, 4, 5, 10, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 4, 5)
    manual = torch.stack([(x[:, c] - spec.mean[c]) / spec.std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(Normalized(nn.Identity(), spec)(x), manual)
    one = InputSpec(3, 4, 5, 10, mean=(0.5,), std=(0.25,))  # one value broadcast
    torch.testing.assert_close(Normalized(nn.Identity(), one)(x), (x - 0.5) / 0.25)


# --- safetensors save/load ---


def test_round_trip_gives_identical_logits(weights, tmp_path):
    net, path = weights
    spec = InputSpec(1, 8, 8, 10, mean=(0.3,), std=(0.7,))
    model = load_classifier(path, "small-cnn", spec)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expected = net.eval()((x - 0.3) / 0.7)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert isinstance(model, Normalized) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # The returned hash is the file's, and saving the wrapper stores only the bare net.
    sha = save_classifier(model, tmp_path / "again.safetensors")
    assert sha == hashlib.sha256((tmp_path / "again.safetensors").read_bytes()).hexdigest()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    header = check_safetensors(path)
    assert set(header) == set(net.state_dict())
    assert header["conv1.weight"]["shape"] == [32, 1, 3, 3]


def test_pickle_is_refused_without_being_unpickled(tmp_path):
    # Sanity: unpickling this payload really does create its sentinel.
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Evil(str(canary))))
    assert canary.exists()

    sentinel = tmp_path / "pwned"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil{protocol}.safetensors"
        path.write_bytes(pickle.dumps(_Evil(str(sentinel)), protocol=protocol))
        with pytest.raises(GauntletError, match="pickle") as err:
            load_classifier(path, "small-cnn", DIGITS)
        assert "safetensors.torch.save_file" in str(err.value)
    assert not sentinel.exists()


def test_torch_save_checkpoints_are_refused(weights, tmp_path):
    net, _ = weights
    zipped = tmp_path / "model.pt"
    torch.save(net.state_dict(), zipped)
    assert zipfile.is_zipfile(zipped)
    with pytest.raises(GauntletError, match="torch.save") as err:
        check_safetensors(zipped)
    assert "safetensors.torch.save_file" in str(err.value)
    legacy = tmp_path / "legacy.pt"  # the pre-1.6 format is a raw pickle stream
    torch.save(net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(GauntletError, match="pickle"):
        load_classifier(legacy, "small-cnn", DIGITS)


def test_damaged_files_are_refused(weights, tmp_path):
    _, good = weights
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    n = struct.unpack("<Q", data[:8])[0]
    cases = {
        "empty": b"",
        "short": b"\x10\x00\x00",
        "truncated": data[: len(data) // 2],
        "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "huge-header": struct.pack("<Q", 2**62) + b"{}",
        "bad-json": struct.pack("<Q", 6) + b"{nope}" + b"\x00" * 16,
        "header-only": data[: 8 + n],
    }
    for label, payload in cases.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(payload)
        with pytest.raises(GauntletError):
            load_classifier(path, "small-cnn", DIGITS)
    with pytest.raises(GauntletError, match="truncated"):
        check_safetensors(tmp_path / "truncated.safetensors")
    with pytest.raises(GauntletError, match="cannot read"):
        check_safetensors(tmp_path / "absent.safetensors")


def test_weights_that_do_not_fit_the_architecture(weights, tmp_path):
    net, path = weights
    with pytest.raises(GauntletError) as err:
        load_classifier(path, "small-cnn", InputSpec(1, 8, 8, 3))
    message = str(err.value)
    assert "small-cnn" in message
    assert "shape mismatch for fc2.weight: file (10, 128) vs model (3, 128)" in message

    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    del state["conv1.bias"]
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd))
    with pytest.raises(GauntletError) as err:
        load_classifier(odd, "small-cnn", DIGITS)
    assert "unexpected keys extra.weight" in str(err.value)
    assert "missing keys conv1.bias" in str(err.value)


def test_forward_check_rejects_wrong_logit_shape(scratch_architectures, tmp_path):
    @register_architecture("wrong-head")
    def wrong(spec):
        return nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.height * spec.width, 7))

    path = tmp_path / "wrong.safetensors"
    save_classifier(wrong(DIGITS), path)
    with pytest.raises(GauntletError, match=r"shape \(1, 10\)"):
        load_classifier(path, "wrong-head", DIGITS)


def test_valid_file_starting_like_a_pickle_is_accepted(tmp_path):
    # A header length of 0x..80 makes byte 0 equal pickle's PROTO opcode; the format
    # check must come before the pickle guess, or such honest files would be refused.
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    for pad in range(64):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert check_safetensors(path) == {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


# --- batched inference ---


def test_predict_in_batches_matches_one_forward_pass():
    torch.manual_seed(0)
    net = build_architecture("small-cnn", DIGITS).eval()
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        reference = net(x)  # everything in one pass: what batching must reproduce
    for batch_size in (1, 3, 10, 64):
        out = predict_in_batches(net, x, batch_size)
        assert out.shape == (10, 10) and not out.requires_grad
        assert torch.allclose(out, reference, atol=1e-5)
    labels = predict_in_batches(net, x, 4, output=lambda out: out.argmax(1))
    assert torch.equal(labels, reference.argmax(1))
    # A callable returning a tuple (a defense's decide) comes back as a tuple of columns.
    bright = x.mean(dim=(1, 2, 3)) > 0.5
    pred, ok = predict_in_batches(lambda b: (net(b).argmax(1), b.mean(dim=(1, 2, 3)) > 0.5), x, 4)
    assert torch.equal(pred, reference.argmax(1)) and torch.equal(ok, bright)


def test_eval_mode_restores_the_training_mode():
    net = nn.Sequential(nn.Dropout(0.5))
    with eval_mode(net):
        assert not net.training
    assert net.training
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("boom")
    assert net.training
