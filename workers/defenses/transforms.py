"""Inference-time input transforms: bit-depth reduction, JPEG, random resize and pad."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.errors import GauntletError
from workers.attacks.base import expect_float, expect_int
from workers.defenses.base import Defense, register_defense


@register_defense
class BitDepth(Defense):
    """Feature squeezing by colour-depth reduction (Xu et al. 2018): round to 2^bits levels."""

    name = "bit-depth"
    differentiable = False

    def __init__(self, model=None, *, bits: int = 3):
        super().__init__(model)
        self.bits = expect_int("bits", bits, 1, 8)

    def config(self):
        return {"bits": self.bits}

    def transform(self, x):
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels


@register_defense
class JPEG(Defense):
    """JPEG compression at ``quality`` (Guo et al. 2018; Das et al. 2017)."""

    name = "jpeg"
    differentiable = False

    def __init__(self, model=None, *, quality: int = 75):
        super().__init__(model)
        self.quality = expect_int("quality", quality, 1, 100)

    def config(self):
        return {"quality": self.quality}

    def transform(self, x):
        from torchvision.io import decode_jpeg, encode_jpeg

        if x.shape[1] not in (1, 3):
            raise GauntletError(f"JPEG needs 1 or 3 channels, but the input has {x.shape[1]}")
        images = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        decoded = [decode_jpeg(encode_jpeg(img, quality=self.quality)) for img in images]
        return torch.stack(decoded).to(x.device, x.dtype) / 255.0


@register_defense
class RandomResizePad(Defense):
    """Random resizing and padding (Xie et al. 2018), then back to the input size.

    Differentiable for a fixed draw, but random: adaptive attacks need EOT over draws.
    """

    name = "random-resize-pad"
    randomized = True

    def __init__(self, model=None, *, max_scale: float = 1.25):
        super().__init__(model)
        self.max_scale = expect_float("max_scale", max_scale, 1.0, 4.0)

    def config(self):
        return {"max_scale": self.max_scale}

    def transform(self, x):
        n, _, h, w = x.shape
        big = max(h + 1, round(h * self.max_scale))
        size = int(torch.randint(h, big, (1,)))
        resized = F.interpolate(x, size=(size, size * w // h), mode="bilinear", align_corners=False)
        pad_h, pad_w = big - resized.shape[2], big - resized.shape[3]
        top, left = int(torch.randint(0, pad_h + 1, (1,))), int(torch.randint(0, pad_w + 1, (1,)))
        padded = F.pad(resized, (left, pad_w - left, top, pad_h - top))
        return F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)


@register_defense
class GaussianNoise(Defense):
    """Additive Gaussian input noise at inference (a randomized defense; cf. Cohen et al.
    2019 without the certification). Differentiable per draw; needs EOT to attack."""

    name = "gaussian-noise"
    randomized = True

    def __init__(self, model=None, *, sigma: float = 0.1):
        super().__init__(model)
        self.sigma = expect_float("sigma", sigma, 0.0, 1.0)

    def config(self):
        return {"sigma": self.sigma}

    def transform(self, x):
        return (x + self.sigma * torch.randn_like(x)).clamp(0.0, 1.0)
