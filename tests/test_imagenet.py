"""The ImageNet dataset on a small generated ImageFolder: layout, preprocessing, subset."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import datasets, imagenet

WNIDS = ("n01440764", "n01443537", "n01484850")


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("val", 7), ("train", 12)):
        for c, wnid in enumerate(WNIDS):
            for i in range(count):
                # Varied sizes and aspect ratios, as ImageNet's are; PNG keeps them lossless.
                h, w = int(rng.integers(230, 330)), int(rng.integers(230, 330))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                pixels[..., 0] = 40 * c  # the class is visible in the red channel's mean
                _write(
                    tmp_path / "imagenet" / split / wnid / f"ILSVRC_{split}_{c}_{i:04d}.png", pixels
                )
    datasets._raw.cache_clear()
    yield tmp_path
    datasets._raw.cache_clear()


def test_the_test_split_is_five_per_class_chosen_by_name_hash(root):
    x, y = datasets.load_split("imagenet", "test", root)
    assert x.shape == (15, 3, 224, 224) and x.dtype == torch.float32
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5  # sorted wnids are the class indices
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # The red channel carries the class: 40 * c / 255, unchanged by resizing a flat channel.
    assert torch.allclose(x[:, 0].mean(dim=(1, 2)), y.float() * 40 / 255, atol=1e-6)
    files = imagenet.chosen_files(root / "imagenet" / "val", 5)
    for wnid in WNIDS:
        names = sorted(p.name for p in (root / "imagenet" / "val" / wnid).iterdir())
        expected = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:5]
        assert [p.name for p, _ in files if p.parent.name == wnid] == expected
    train_x, train_y = datasets.load_split("imagenet", "train", root)
    assert train_x.shape == (30, 3, 224, 224) and torch.bincount(train_y).tolist() == [10] * 3


def test_preprocessing_is_resize_256_then_centre_crop_224(tmp_path):
    # No resampling needed when the short side is already 256: a pure crop, offsets known.
    rng = np.random.default_rng(1)
    exact = rng.integers(0, 256, size=(256, 300, 3), dtype=np.uint8)
    _write(tmp_path / "a.png", exact)
    out = imagenet.preprocess(tmp_path / "a.png")
    assert np.array_equal(out, exact[16 : 16 + 224, 38 : 38 + 224].transpose(2, 0, 1))
    # With resampling: the same pixels as torchvision's Resize(256) + CenterCrop(224).
    from torchvision import transforms

    odd = rng.integers(0, 256, size=(333, 517, 3), dtype=np.uint8)
    _write(tmp_path / "b.png", odd)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    expected = np.asarray(reference(Image.open(tmp_path / "b.png").convert("RGB")))
    assert np.array_equal(imagenet.preprocess(tmp_path / "b.png"), expected.transpose(2, 0, 1))


def test_evaluation_subsets_come_from_the_fixed_split_and_suites_use_4_over_255(root):
    from gauntlet.scheduler.suites import load_suite

    info = datasets.dataset_info("imagenet")
    assert (info.channels, info.height, info.width, info.num_classes) == (3, 224, 224, 1000)
    assert info.test_size == 5000
    x, y, indices = datasets.eval_subset("imagenet", 6, 3, root)
    full_x, full_y = datasets.load_split("imagenet", "test", root)
    assert torch.equal(x, full_x[indices]) and torch.equal(y, full_y[indices])
    assert torch.equal(indices, datasets.eval_subset("imagenet", 6, 3, root)[2])
    for suite in ("quick", "standard-linf", "autoattack"):
        assert load_suite(suite).budget("linf", "imagenet") == pytest.approx(4 / 255)


def test_a_missing_folder_or_a_broken_image_is_one_clear_error(tmp_path, root):
    datasets._raw.cache_clear()
    with pytest.raises(GauntletError, match="expected an ImageFolder at"):
        datasets.load_split("imagenet", "test", tmp_path / "nowhere")
    with pytest.raises(GauntletError, match="cannot be downloaded automatically"):
        datasets.download("imagenet", tmp_path)
    ((broken, _), *_) = imagenet.chosen_files(root / "imagenet" / "val", 5)
    broken.write_bytes(b"not an image")
    with pytest.raises(GauntletError, match="cannot read image"):
        imagenet.load("test", root)
