"""Tests for workers.corruptions: shapes, ranges, determinism, severity ordering, metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    corruption_metrics,
    pixelate_block,
)

NOISE = ("gaussian-noise", "shot-noise", "impulse-noise")
SHAPES = [(16, 1, 8, 8), (8, 1, 28, 28), (8, 3, 32, 32), (2, 3, 64, 64)]


def _images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Natural-ish images: smooth low-frequency content plus a little texture, in (0.05, 0.95)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    coarse = torch.rand(n, c, max(2, h // 4), max(2, w // 4), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    texture = 0.2 * torch.rand(n, c, h, w, generator=g)
    return (0.05 + 0.9 * (0.8 * smooth + texture)).clamp(0.05, 0.95)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mean_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten(1).norm(dim=1).mean())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_shape_range_and_determinism(name: str, shape: tuple[int, ...]) -> None:
    x = _images(shape)
    for s in SEVERITIES:
        out = corrupt(x, name, s, _gen(7))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out, corrupt(x, name, s, _gen(7)))
    assert not torch.equal(corrupt(x, name, 5, _gen(7)), x)


@pytest.mark.parametrize("name", NOISE)
def test_random_corruptions_depend_on_the_generator(name: str) -> None:
    x = _images((4, 3, 32, 32))
    assert not torch.equal(corrupt(x, name, 3, _gen(1)), corrupt(x, name, 3, _gen(2)))


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (32, 3, 32, 32)])
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_higher_severity_moves_further(name: str, shape: tuple[int, ...]) -> None:
    x = _images(shape, seed=3)
    dist = [_mean_l2(corrupt(x, name, s, _gen(s)), x) for s in SEVERITIES]
    assert dist[-1] > dist[0] > 0
    pairs = list(zip(dist, dist[1:], strict=False))
    if name in NOISE:
        assert all(a < b for a, b in pairs), dist
    else:
        assert all(a <= b + 1e-9 for a, b in pairs), dist


def test_brightness_raises_mean_and_contrast_lowers_std() -> None:
    x = _images((8, 3, 32, 32))
    for s in SEVERITIES:
        assert float(corrupt(x, "brightness", s, _gen()).mean()) > float(x.mean())
        out = corrupt(x, "contrast", s, _gen())
        # Contrast shrinks towards each channel's mean: same mean, smaller spread.
        assert torch.allclose(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
        assert torch.all(out.std(dim=(2, 3)) < x.std(dim=(2, 3)))


def test_brightness_on_one_channel_adds_value() -> None:
    x = torch.full((1, 1, 4, 4), 0.5)
    assert torch.allclose(corrupt(x, "brightness", 1, _gen()), torch.full_like(x, 0.55))


def test_impulse_noise_sets_growing_fraction_to_extremes() -> None:
    x = _images((16, 3, 32, 32))  # no natural 0s or 1s
    fractions = []
    for s in SEVERITIES:
        out = corrupt(x, "impulse-noise", s, _gen(s))
        extreme = (out == 0) | (out == 1)
        assert torch.equal(out[~extreme], x[~extreme])  # everything else untouched
        fractions.append(float(extreme.float().mean()))
    assert all(a < b for a, b in zip(fractions, fractions[1:], strict=False)), fractions
    assert fractions[0] == pytest.approx(0.01, abs=0.005)
    assert fractions[-1] == pytest.approx(0.07, abs=0.01)


@pytest.mark.parametrize("side", [8, 28, 32])
def test_pixelate_is_piecewise_constant_on_blocks(side: int) -> None:
    x = _images((4, 3, side, side))
    for s in SEVERITIES:
        out = corrupt(x, "pixelate", s, _gen())
        b = pixelate_block(side, s)
        assert 2 <= b <= side
        for i in range(0, side, b):
            for j in range(0, side, b):
                block = out[:, :, i : i + b, j : j + b]
                assert torch.equal(block, block[:, :, :1, :1].expand_as(block))
                # Each block carries the mean of the pixels it covers.
                mean = x[:, :, i : i + b, j : j + b].mean(dim=(2, 3))
                assert torch.allclose(block[:, :, 0, 0], mean, atol=1e-6)
        assert not torch.equal(out, x)


def test_jpeg_differs_but_correlates() -> None:
    x = _images((8, 3, 32, 32))
    for s in SEVERITIES:
        out = corrupt(x, "jpeg", s, _gen())
        assert not torch.equal(out, x)
        corr = torch.corrcoef(torch.stack([out.flatten(), x.flatten()]))[0, 1]
        assert float(corr) > 0.85  # the texture is per-channel noise, which JPEG drops


def _pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The reference codec: Pillow's JPEG at ``quality``, on 8-bit images."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for img in (x * 255).round().to(torch.uint8):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).squeeze(2).numpy()).save(buf, "JPEG", quality=quality)
        decoded = np.array(Image.open(io.BytesIO(buf.getvalue())))
        out.append(torch.from_numpy(decoded.reshape(*img.shape[1:], -1)).permute(2, 0, 1))
    return torch.stack(out).float() / 255


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_matches_pillow_at_the_cifar_c_qualities(channels: int) -> None:
    # Both wrap libjpeg with the standard tables; allow one grey level for codec builds.
    x = _images((4, channels, 32, 32))
    for s, quality in zip(SEVERITIES, (80, 65, 58, 50, 40), strict=True):
        out = corrupt(x, "jpeg", s, _gen())
        assert (out - _pil_jpeg(x, quality)).abs().max() <= 1 / 255 + 1e-6


def test_gaussian_blur_spreads_a_point_with_the_closed_form_kernel() -> None:
    # Severity 1 on small images: sigma 0.4, truncated at ceil(4 sigma) = 2 pixels.
    sigma, radius = 0.4, 2
    point = torch.zeros(1, 1, 9, 9)
    point[0, 0, 4, 4] = 1.0
    out = corrupt(point, "gaussian-blur", 1, _gen())[0, 0]
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    expected = torch.zeros(9, 9, dtype=torch.float64)
    expected[4 - radius : 5 + radius, 4 - radius : 5 + radius] = weights / weights.sum()
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_blurs_are_smoother() -> None:
    x = _images((8, 1, 28, 28))

    def roughness(t: torch.Tensor) -> float:
        return float((t[..., 1:] - t[..., :-1]).abs().mean())

    for name in ("gaussian-blur", "defocus-blur"):
        assert roughness(corrupt(x, name, 5, _gen())) < roughness(x)


def test_bad_arguments_raise() -> None:
    x = _images((2, 1, 8, 8))
    with pytest.raises(GauntletError, match="gaussian-noise"):
        corrupt(x, "fog", 1, _gen())
    for bad in (0, 6, -1, True, 2.0):
        with pytest.raises(GauntletError, match="severity"):
            corrupt(x, "contrast", bad, _gen())
    with pytest.raises(GauntletError):
        corrupt(x[0], "contrast", 1, _gen())
    with pytest.raises(GauntletError, match="channels"):
        corrupt(torch.rand(1, 2, 8, 8), "jpeg", 1, _gen())


def test_corruption_metrics_on_digits(digits_models) -> None:
    from gauntlet.workers.datasets import eval_subset
    from gauntlet.workers.models import InputSpec, load_classifier

    model = load_classifier(digits_models["standard"], "small-cnn", InputSpec(1, 8, 8, 10))
    x, y, _ = eval_subset("digits", 100, 0, None)
    with torch.no_grad():
        clean = float((model(x).argmax(dim=1) == y).float().mean())
    metrics = corruption_metrics(model, x, y, batch_size=64, seed=0)
    by_name = {m.name: m for m in metrics}
    expected = 2 * len(CORRUPTIONS) * (len(SEVERITIES) + 1) + 2
    assert len(by_name) == len(metrics) == expected
    for m in metrics:
        assert m.n == 100 and 0.0 <= m.value <= 1.0
    for name in CORRUPTIONS:
        accs = [by_name[f"acc@{name}@{s}"].value for s in SEVERITIES]
        assert by_name[f"acc@{name}"].value == pytest.approx(sum(accs) / 5)
        eces = [by_name[f"ece@{name}@{s}"].value for s in SEVERITIES]
        assert by_name[f"ece@{name}"].value == pytest.approx(sum(eces) / 5)
    assert by_name["acc@gaussian-noise@1"].value >= by_name["acc@gaussian-noise@5"].value
    mean_acc = by_name["mean_corruption_accuracy"].value
    assert 0.0 < mean_acc < clean
    assert 0.0 <= by_name["mean_corruption_ece"].value <= 1.0
    # Seeded per (corruption, severity): the same call gives the same numbers.
    again = corruption_metrics(model, x, y, batch_size=100, seed=0)
    assert [m.value for m in again] == [m.value for m in metrics]
