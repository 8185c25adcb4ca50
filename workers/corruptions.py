"""Common corruptions (Hendrycks & Dietterich 2019) and the robustness metrics built on them.

Each corruption takes images (N, C, H, W) in [0, 1], a severity 1..5 and a
``torch.Generator``, and returns images in [0, 1] of the same shape; all randomness comes
from the generator, so a fixed generator state gives the same output. Parameters follow
the CIFAR-10-C tables (``make_cifar_c.py``) per severity.

Image size: CIFAR-10-C's parameters are for 32x32 images, the smallest of the benchmark's
tables (ImageNet-C's are for 224x224 and roughly 7x larger for blurs). We therefore
- scale blur radii by ``max(1, side / 32)``: larger images get proportionally larger blurs
  (as ImageNet-C does), but images smaller than 32 pixels keep the CIFAR values, because
  shrinking a 0.4-pixel sigma further would make the blur a no-op on 8x8 digits;
- pixelate over whole square blocks (2..4 pixels up to 32x32, scaled above), not
  CIFAR-10-C's fractional box resampling, which on such small images gives irregular cells
  and a distortion that is not monotone in severity (see ``pixelate``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.batches import predict_in_batches
from gauntlet.workers.calibration import metrics as calibration
from gauntlet.workers.defenses.smoothing import gaussian_kernel_1d
from gauntlet.workers.defenses.transforms import jpeg_round_trip
from gauntlet.workers.results import Metric, wilson_interval

SEVERITIES = (1, 2, 3, 4, 5)

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _level(table: Sequence, severity: int):
    """The table entry for ``severity``; guards the raw functions against bad indices."""
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise GauntletError(f"Expected `severity` to be an integer in 1..5, but got {severity!r}")
    return table[severity - 1]


def _rand(shape: torch.Size, gen: torch.Generator, like: torch.Tensor, normal: bool = False):
    """Random draws on the generator's device (required by torch), moved to the images'."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=gen, device=gen.device).to(like.device, like.dtype)


def _blur_scale(x: torch.Tensor) -> float:
    return max(1.0, min(x.shape[-2], x.shape[-1]) / 32.0)


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Depthwise 2-D convolution of every channel with one odd-sized kernel."""
    k = kernel.to(x.device, x.dtype)
    pad = k.shape[-1] // 2
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    # Reflect padding needs pad < size; tiny images with large kernels fall back to replicate.
    if mode == "reflect" and (pad >= h or pad >= w):
        mode = "replicate"
    padded = F.pad(flat, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(padded, k[None, None]).reshape(n, c, h, w)


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """The separable 2-D Gaussian over offsets -radius..radius, from the blur defense's
    1-D weights, so the blur corruption and the ``gaussian-blur`` defense agree."""
    g = gaussian_kernel_1d(sigma, 2 * radius + 1)
    return torch.outer(g, g)


# --- noise -------------------------------------------------------------------------------


def gaussian_noise(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    sigma = _level([0.04, 0.06, 0.08, 0.09, 0.10], severity)
    return (x + sigma * _rand(x.shape, gen, x, normal=True)).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # Photon counts: Poisson with rate x * c, rescaled; a smaller c means fewer photons.
    rate = _level([500, 250, 100, 75, 50], severity)
    lam = (x.detach().clamp(0, 1) * rate).to(gen.device, torch.float64)
    counts = torch.poisson(lam, generator=gen)
    return (counts / rate).to(x.device, x.dtype).clamp(0, 1)


def impulse_noise(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # Salt and pepper per element (as skimage's random_noise does), half salt, half pepper.
    amount = _level([0.01, 0.02, 0.03, 0.05, 0.07], severity)
    hit = _rand(x.shape, gen, x) < amount
    salt = (_rand(x.shape, gen, x) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x.clamp(0, 1))


# --- blur --------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    sigma = _level([0.4, 0.6, 0.7, 0.8, 1.0], severity) * _blur_scale(x)
    # skimage's gaussian truncates at 4 sigma and pads with the nearest edge value.
    kernel = _gaussian_kernel(sigma, max(1, math.ceil(4 * sigma)))
    return _filter(x, kernel, "replicate").clamp(0, 1)


def defocus_blur(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # A disk of the given radius, softened by a small Gaussian against aliasing (CIFAR-10-C).
    radius, alias = _level([(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)], severity)
    scale = _blur_scale(x)
    radius, alias = radius * scale, alias * scale
    half = math.ceil(radius) + 1
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).to(torch.float64)
    disk = disk / disk.sum()
    g = _gaussian_kernel(alias, max(1, math.ceil(3 * alias)))
    kernel = F.conv2d(disk[None, None], g[None, None], padding=g.shape[-1] // 2)[0, 0]
    # cv2.filter2D's default border is reflect-101, which is torch's "reflect".
    return _filter(x, kernel / kernel.sum(), "reflect").clamp(0, 1)


# --- digital -----------------------------------------------------------------------------


def contrast(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    c = _level([0.75, 0.5, 0.4, 0.3, 0.15], severity)
    means = x.mean(dim=(2, 3), keepdim=True)  # per image and channel, as CIFAR-10-C
    return ((x - means) * c + means).clamp(0, 1)


def brightness(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # CIFAR-10-C adds c to HSV value. With hue and saturation fixed, that scales RGB by
    # v'/v; a black pixel (v = 0) has no hue and becomes grey v'. One channel: v is x.
    c = _level([0.05, 0.1, 0.15, 0.2, 0.3], severity)
    x = x.clamp(0, 1)
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    ratio = v_new / v.clamp(min=1e-12)
    return torch.where(v > 0, x * ratio, v_new.expand_as(x)).clamp(0, 1)


def jpeg(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # The same codec round trip as the ``jpeg`` defense, at CIFAR-10-C's qualities.
    return jpeg_round_trip(x, _level([80, 65, 58, 50, 40], severity))


def pixelate_block(side: int, severity: int) -> int:
    """Side of the square blocks that pixelate averages over, for an image ``side`` wide."""
    # Blocks of 1/f pixels, f being ImageNet-C's fractions [0.6, 0.5, 0.4, 0.3, 0.25],
    # rounded half up, for images up to 32 pixels; larger images scale them with their side.
    block = _level([2, 2, 3, 3, 4], severity) * max(1.0, side / 32.0)
    return max(2, min(side, math.floor(block + 0.5)))


def pixelate(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    # CIFAR-10-C box-resamples to a fraction (0.95 .. 0.65) of the side. On 8..32 pixel
    # images that leaves irregular 1-2 pixel cells, so the distortion is not monotone in
    # severity (27 px of 32 moves images further than 24) and barely visible at 8x8. We
    # average over whole square blocks instead: exactly piecewise constant, and monotone.
    h, w = x.shape[-2:]
    bh, bw = pixelate_block(h, severity), pixelate_block(w, severity)
    # ceil_mode keeps a partial block at the right/bottom edge, averaged over its pixels.
    small = F.avg_pool2d(x, (bh, bw), stride=(bh, bw), ceil_mode=True)
    big = small.repeat_interleave(bh, dim=2).repeat_interleave(bw, dim=3)
    return big[..., :h, :w].clamp(0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian-noise": gaussian_noise,
    "shot-noise": shot_noise,
    "impulse-noise": impulse_noise,
    "defocus-blur": defocus_blur,
    "gaussian-blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Apply the corruption ``name`` at ``severity`` (1..5), checking the arguments."""
    if name not in CORRUPTIONS:
        known = ", ".join(sorted(CORRUPTIONS))
        raise GauntletError(f"Unknown corruption {name!r}; known corruptions: {known}")
    _level(SEVERITIES, severity)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.dtype.is_floating_point:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise GauntletError(f"Expected float images of shape (N, C, H, W), but got {shape}")
    return CORRUPTIONS[name](x, severity, generator)


def _seed_for(seed: int, name: str, severity: int) -> int:
    # crc32 is stable across processes (unlike hash()), so results do not depend on
    # PYTHONHASHSEED, and each (corruption, severity) gets its own independent stream.
    return (seed * 1_000_003 + zlib.crc32(f"{name}@{severity}".encode())) % (2**63)


def _predict_probs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    # Each batch's logits come back to the CPU at once: 45 corrupted copies of the set
    # are scored in turn, and the accelerator need never hold more than one batch's.
    logits = predict_in_batches(model, x, batch_size, output=lambda out: out.float().cpu())
    return logits.softmax(dim=1)


def corruption_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> list[Metric]:
    """Accuracy and ECE under every corruption and severity, with their means.

    Names: ``acc@{name}@{s}`` / ``ece@{name}@{s}`` per severity, ``acc@{name}`` /
    ``ece@{name}`` averaged over severities, and ``mean_corruption_accuracy`` /
    ``mean_corruption_ece`` over all corruptions (the mean of the per-corruption means).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GauntletError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GauntletError(f"Expected `seed` to be a non-negative int, but got {seed!r}")
    model.eval()
    x, y = x.detach().cpu(), y.detach().cpu().long()
    n = len(x)
    metrics: list[Metric] = []
    acc_means, ece_means = [], []
    for name in CORRUPTIONS:
        accs, eces = [], []
        for s in SEVERITIES:
            gen = torch.Generator().manual_seed(_seed_for(seed, name, s))
            probs = _predict_probs(model, corrupt(x, name, s, gen), batch_size)
            correct = int((probs.argmax(dim=1) == y).sum())
            ece, _ = calibration.ece(probs, y)
            low, high = wilson_interval(correct, n)
            metrics.append(Metric(f"acc@{name}@{s}", correct / n, n, low, high))
            metrics.append(Metric(f"ece@{name}@{s}", ece, n))
            accs.append(correct / n)
            eces.append(ece)
        acc_means.append(sum(accs) / len(accs))
        ece_means.append(sum(eces) / len(eces))
        metrics.append(Metric(f"acc@{name}", acc_means[-1], n))
        metrics.append(Metric(f"ece@{name}", ece_means[-1], n))
    metrics.append(Metric("mean_corruption_accuracy", sum(acc_means) / len(acc_means), n))
    metrics.append(Metric("mean_corruption_ece", sum(ece_means) / len(ece_means), n))
    return metrics
