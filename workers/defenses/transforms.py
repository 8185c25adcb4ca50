"""Inference-time input transforms: bit-depth reduction, JPEG, random resize and pad."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.defenses.base import Defense, register_defense
from gauntlet.workers.hyperparams import integer, real


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1], JPEG-encoded at ``quality`` and decoded again.

    Shared by the ``jpeg`` defense and the ``jpeg`` corruption, so the defense is scored
    against exactly the compression the corruption benchmark applies. Pixels are rounded
    to 8 bits first (what a saved image holds); torchvision's codec runs on the CPU.
    """
    from torchvision.io import decode_jpeg, encode_jpeg

    if x.shape[1] not in (1, 3):
        raise GauntletError(f"JPEG needs 1 or 3 channels, but the input has {x.shape[1]}")
    images = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    decoded = [decode_jpeg(encode_jpeg(img, quality=quality)) for img in images]
    return torch.stack(decoded).to(x.device, x.dtype) / 255.0


@register_defense
class BitDepth(Defense):
    """Feature squeezing by colour-depth reduction (Xu et al. 2018): round to 2^bits levels."""

    name = "bit-depth"
    differentiable = False

    hyperparams = {"bits": integer(3, 1, 8)}

    def transform(self, x):
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels


@register_defense
class JPEG(Defense):
    """JPEG compression at ``quality`` (Guo et al. 2018; Das et al. 2017)."""

    name = "jpeg"
    differentiable = False

    hyperparams = {"quality": integer(75, 1, 100)}

    def transform(self, x):
        return jpeg_round_trip(x, self.quality)


@register_defense
class RandomResizePad(Defense):
    """Random resizing and padding (Xie et al. 2018), then back to the input size.

    Each image gets its own draw: it is scaled to a random side ``r`` in
    ``[h, h * max_scale]`` and placed at a random offset on a zero canvas of side
    ``h * max_scale``, which is then resized back to ``h``. The composition is one affine
    map of coordinates, so it runs as a single ``grid_sample`` (one interpolation instead
    of two, and no Python loop over images). Differentiable for a fixed draw, but
    random: adaptive attacks need EOT over draws.
    """

    name = "random-resize-pad"
    randomized = True
    # 2: judged on `draws` fresh draws, attacked for the whole budget (workers/jobs/draws.py).
    version = 2

    hyperparams = {"max_scale": real(1.15, 1.0, 4.0)}

    def transform(self, x):
        n = x.shape[0]
        # Draws come from the global generator, which the evaluation seeds per chunk.
        scale = 1.0 + (self.max_scale - 1.0) * torch.rand(n, 1, device=x.device)
        # Offsets in units of the resized image, one per axis: (top, left) / r.
        offset = (self.max_scale - scale) * torch.rand(n, 2, device=x.device) / scale
        # Output u in [-1, 1] covers the canvas; the image occupies canvas coordinates
        # [offset, offset + 1] * r, so in the image's own normalised coordinates
        # v = (max_scale / scale) * (u + 1) - 2 * offset - 1.
        a = self.max_scale / scale
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = a.squeeze(1)
        theta[:, 0, 2] = (a.squeeze(1) - 2 * offset[:, 1] - 1).to(x.dtype)  # x: left
        theta[:, 1, 2] = (a.squeeze(1) - 2 * offset[:, 0] - 1).to(x.dtype)  # y: top
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_defense
class GaussianNoise(Defense):
    """Additive Gaussian input noise at inference (a randomized defense; cf. Cohen et al.
    2019 without the certification). Differentiable per draw; needs EOT to attack."""

    name = "gaussian-noise"
    randomized = True
    # 2: judged on `draws` fresh draws, attacked for the whole budget (workers/jobs/draws.py).
    version = 2

    hyperparams = {"sigma": real(0.1, 0.0, 1.0)}

    def transform(self, x):
        return (x + self.sigma * torch.randn_like(x)).clamp(0.0, 1.0)
