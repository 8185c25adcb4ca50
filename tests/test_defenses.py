"""Smoothing defenses: Gaussian blur, median filter and total-variation minimisation."""

from __future__ import annotations

import math

import pytest
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.defenses import DEFENSES, build_defense
from gauntlet.workers.defenses.smoothing import gaussian_kernel_1d, total_variation
from tests.service_helpers import metric as _metric
from tests.service_helpers import run_eval

N = 64


def _transform(name: str, x: torch.Tensor, **params) -> torch.Tensor:
    return build_defense(name, params, None).transform(x)


def test_gaussian_blur_keeps_constants_and_spreads_a_point_with_gaussian_weights():
    const = torch.full((2, 3, 8, 8), 0.37)
    assert torch.allclose(_transform("gaussian-blur", const), const, atol=1e-6)

    sigma = 0.8
    point = torch.zeros(1, 1, 9, 9)
    point[0, 0, 4, 4] = 1.0
    out = _transform("gaussian-blur", point, sigma=sigma, kernel=3)
    # Hand-computed: weights exp(-d^2 / 2 sigma^2) at d = -1, 0, 1, normalised to sum 1.
    side = math.exp(-1 / (2 * sigma**2))
    g = torch.tensor([side, 1.0, side]) / (1 + 2 * side)
    expected = torch.zeros(9, 9)
    expected[3:6, 3:6] = torch.outer(g, g)
    assert torch.allclose(out[0, 0], expected, atol=1e-6)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # mass is conserved

    x = torch.rand(4, 3, 16, 16)
    blurred = _transform("gaussian-blur", x, sigma=2.0, kernel=5)
    assert blurred.shape == x.shape
    assert blurred.min() >= 0 and blurred.max() <= 1


def test_gaussian_kernel_matches_torchvision():
    # torchvision's blur builds its kernel independently (exp(-x^2 / 2 sigma^2), then
    # normalised); a point's blur is the 2-D kernel, whose column sums are the 1-D one.
    from torchvision.transforms.functional import gaussian_blur

    for sigma, kernel in ((0.5, 3), (1.0, 5), (2.5, 9)):
        # Side 2 * kernel + 1: the reflect padding never mirrors the point back in.
        side, centre, half = 2 * kernel + 1, kernel, kernel // 2
        point = torch.zeros(1, 1, side, side)
        point[0, 0, centre, centre] = 1.0
        blurred = gaussian_blur(point, [kernel, kernel], [sigma, sigma])[0, 0].sum(dim=0)
        reference = blurred[centre - half : centre + half + 1]
        ours = gaussian_kernel_1d(sigma, kernel)
        assert ours.dtype == torch.float64 and ours.sum().item() == pytest.approx(1.0)
        assert torch.allclose(ours.float(), reference, atol=1e-6)


def test_gaussian_blur_is_differentiable():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    blur = build_defense("gaussian-blur", {}, net)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(blur(x).sum(), x)
    assert g.abs().sum() > 0


def test_median_removes_isolated_salt_and_pepper_exactly():
    clean = torch.full((1, 2, 8, 8), 0.5)
    noisy = clean.clone()
    for c, i, j, v in [(0, 1, 1, 1.0), (0, 4, 5, 0.0), (1, 0, 7, 1.0), (1, 6, 2, 0.0)]:
        noisy[0, c, i, j] = v
    assert torch.equal(_transform("median", noisy), clean)


def _reflect(i: int, size: int) -> int:
    """Reflect an index into [0, size) without repeating the edge, as reflect padding does."""
    return -i if i < 0 else 2 * (size - 1) - i if i >= size else i


def test_median_matches_a_naive_window_median():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 7, 6)
    out = _transform("median", x, kernel=3)
    _, _, h, w = x.shape
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(h):
                for j in range(w):
                    window = torch.stack(
                        [
                            x[n, c, _reflect(i + di, h), _reflect(j + dj, w)]
                            for di in (-1, 0, 1)
                            for dj in (-1, 0, 1)
                        ]
                    )
                    assert out[n, c, i, j] == torch.median(window)


def test_tv_lowers_total_variation_and_more_weight_smooths_more():
    torch.manual_seed(0)
    ramp = torch.linspace(0.2, 0.8, 16).expand(1, 3, 16, 16)
    noisy = (ramp + 0.1 * torch.randn(1, 3, 16, 16)).clamp(0, 1)
    small = _transform("tv", noisy, weight=0.03)
    large = _transform("tv", noisy, weight=0.3)
    tv_x, tv_small, tv_large = (total_variation(z).item() for z in (noisy, small, large))
    assert tv_small < tv_x
    assert tv_large < 0.5 * tv_small  # a larger weight gives a much smoother image
    # Small weight: the solution stays near x. z = x - (w / 2) div p with |p| <= 1 and
    # |div p| <= 4, so no pixel moves more than 2 w.
    assert (small - noisy).abs().max() <= 2 * 0.03 + 1e-6
    assert (large - noisy).abs().mean() > (small - noisy).abs().mean()
    # The solver actually decreases the objective it claims to minimise (z = x scores w TV(x)).
    for weight, z in [(0.03, small), (0.3, large)]:
        objective = ((z - noisy) ** 2).sum() + weight * total_variation(z).sum()
        assert objective < weight * tv_x
    assert large.min() >= 0 and large.max() <= 1


def test_names_reprs_and_bad_params():
    assert {"gaussian-blur", "median", "tv"} <= set(DEFENSES)
    assert repr(build_defense("gaussian-blur", {}, None)) == "GaussianBlur(sigma=1.0, kernel=3)"
    assert repr(build_defense("median", {"kernel": 5}, None)) == "Median(kernel=5)"
    assert repr(build_defense("tv", {"weight": 1}, None)) == "TotalVariation(weight=1.0, steps=30)"
    assert build_defense("tv", {}, None).config() == {"weight": 0.03, "steps": 30}
    assert not DEFENSES["median"].differentiable and not DEFENSES["tv"].differentiable
    assert DEFENSES["gaussian-blur"].differentiable
    bad = [
        ("gaussian-blur", {"sigma": 0}),
        ("gaussian-blur", {"sigma": "1"}),
        ("gaussian-blur", {"kernel": 4}),
        ("gaussian-blur", {"kernel": 3.0}),
        ("median", {"kernel": 0}),
        ("median", {"kernel": 2}),
        ("median", {"size": 3}),
        ("tv", {"weight": -0.1}),
        ("tv", {"weight": float("nan")}),
        ("tv", {"steps": 0}),
        ("tv", {"steps": True}),
    ]
    for name, params in bad:
        with pytest.raises(GauntletError):
            build_defense(name, params, None)
    with pytest.raises(GauntletError, match="too large"):
        _transform("median", torch.rand(1, 1, 8, 8), kernel=17)


def _run(stored, **spec):
    return run_eval(stored, n=N, **spec)


def test_smoothing_keeps_clean_accuracy(stored):
    bare = _metric(_run(stored, eps=0.01), "clean_accuracy")
    assert bare > 0.9
    # Measured at n=64: bare 0.98, tv 0.98, gaussian-blur 0.91, median 0.70. On 8x8 digits
    # a 3x3 median erases whole strokes; the bounds leave room for other seeds, not for a
    # broken transform (which lands near chance, 0.1).
    floors = {"tv": 0.9, "gaussian-blur": 0.8, "median": 0.55}
    for defense, floor in floors.items():
        clean = _metric(_run(stored, defense=defense, eps=0.01), "clean_accuracy")
        assert clean > floor, (defense, clean, bare)


@pytest.mark.parametrize("defense", ["median", "tv"])
def test_bpda_breaks_non_differentiable_smoothing(stored, defense):
    plain = _run(stored, defense=defense, adaptive=False)
    bpda = _run(stored, defense=defense, adaptive=True)
    clean = _metric(plain, "clean_accuracy")
    assert any("gradients are zero" in f for f in plain.details["flags"])
    assert _metric(plain, "robust_accuracy") > 0.8 * clean
    assert bpda.details["adaptations"] == ["bpda"]
    assert _metric(bpda, "robust_accuracy") < _metric(plain, "robust_accuracy") - 0.4
