"""Dataset registry: offline digits, MNIST through torchvision's own reader, subsets."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.datasets import dataset_info, dataset_names, eval_subset, load_split


def test_registry_lists_builtins():
    names = set(dataset_names())
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "gtsrb"} <= names
    info = dataset_info("cifar10")
    assert (info.channels, info.height, info.width, info.num_classes) == (3, 32, 32, 10)
    assert len(info.mean) == len(info.std) == 3
    assert dataset_info("gtsrb").num_classes == 43
    with pytest.raises(GauntletError, match="known datasets: .*digits"):
        dataset_info("imagenet-9000")


def test_digits_splits():
    train_x, train_y = load_split("digits", "train", None)
    test_x, test_y = load_split("digits", "test", None)
    assert train_x.shape == (1347, 1, 8, 8) and test_x.shape == (450, 1, 8, 8)
    assert dataset_info("digits").test_size == len(test_y)  # suites cap n with it
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert float(train_x.min()) == 0.0 and float(train_x.max()) == 1.0
    assert set(test_y.tolist()) == set(range(10))
    # As multisets the two splits add up to exactly the digits set: no example is in both
    # and none is lost (digits holds a few repeated images, so sets would not prove it).
    ref = load_digits()

    def examples(x: torch.Tensor, y) -> Counter:
        return Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True))

    ref_x = torch.tensor(ref.images / 16, dtype=torch.float32)[:, None]
    assert examples(train_x, train_y) + examples(test_x, test_y) == examples(ref_x, ref.target)
    # The cache must not hand out a tensor a caller could corrupt for the next one.
    train_x.zero_()
    assert float(load_split("digits", "train", None)[0].max()) == 1.0
    with pytest.raises(GauntletError, match="split"):
        load_split("digits", "validation", None)


def test_eval_subset_is_deterministic_and_sorted():
    x, y, idx = eval_subset("digits", 100, seed=7, data_root=None)
    x2, y2, idx2 = eval_subset("digits", 100, seed=7, data_root=None)
    assert x.shape == (100, 1, 8, 8) and y.shape == (100,) and idx.dtype == torch.int64
    assert torch.equal(idx, idx2) and torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == 100
    test_x, test_y = load_split("digits", "test", None)
    assert torch.equal(x, test_x[idx]) and torch.equal(y, test_y[idx])
    expected = np.sort(np.random.default_rng(7).permutation(450)[:100])
    assert idx.tolist() == expected.tolist()
    assert not torch.equal(idx, eval_subset("digits", 100, seed=8, data_root=None)[2])
    with pytest.raises(GauntletError, match="450"):
        eval_subset("digits", 451, seed=0, data_root=None)
    for n, seed in ((0, 0), (10, -1), (2.5, 0)):
        with pytest.raises(GauntletError):
            eval_subset("digits", n, seed=seed, data_root=None)


def test_eval_subset_is_the_same_in_another_process():
    code = (
        "from gauntlet.workers.datasets import eval_subset;"
        "print(eval_subset('digits', 20, 3, None)[2].tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == str(eval_subset("digits", 20, 3, None)[2].tolist())


def _write_idx(path, array: np.ndarray) -> None:
    # IDX: magic = 0x0000, dtype code 0x08 (uint8), number of dims; sizes big-endian.
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root, folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits upsampled to 28x28, written in MNIST's raw layout under root/folder/raw."""
    ref = load_digits()
    images = torch.tensor(ref.images[:, None] * 255 / 16, dtype=torch.float32)
    big = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear")
    big = big.round().clamp(0, 255).squeeze(1).numpy().astype(np.uint8)
    splits = {"train": (big[:60], ref.target[:60]), "t10k": (big[60:100], ref.target[60:100])}
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, (x, y) in splits.items():
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return splits


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_format_through_torchvision(tmp_path, name, folder):
    splits = _fake_mnist(tmp_path, folder)
    x, y = load_split(name, "test", tmp_path)
    images, labels = splits["t10k"]
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == labels.tolist()
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255)
    assert load_split(name, "train", tmp_path)[0].shape == (60, 1, 28, 28)
    sx, sy, idx = eval_subset(name, 10, 0, tmp_path)
    assert sx.shape == (10, 1, 28, 28) and sy.tolist() == labels[idx.numpy()].tolist()


def test_missing_dataset_says_how_to_fetch_it(tmp_path):
    for name in ("mnist", "cifar10"):
        with pytest.raises(GauntletError) as err:
            load_split(name, "test", tmp_path)
        message = str(err.value)
        assert f"dataset '{name}' not found under" in message
        assert f"gauntlet data download {name}" in message
    with pytest.raises(GauntletError, match="data root"):
        load_split("mnist", "test", None)
