"""Inference-time smoothing defenses: Gaussian blur, median filter, total-variation denoising."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.defenses.base import Defense, register_defense
from gauntlet.workers.hyperparams import Hyper, expect_int, integer, real

MAX_KERNEL = 31


def _odd_kernel(name: str, kernel: Any) -> int:
    kernel = expect_int(name, kernel, 1, MAX_KERNEL)
    if kernel % 2 == 0:
        raise GauntletError(f"Expected `{name}` to be odd, but got {kernel}")
    return kernel


ODD_KERNEL = Hyper(3, _odd_kernel)


def _reflect_pad(x: torch.Tensor, kernel: int, defense: str) -> torch.Tensor:
    pad = kernel // 2
    # Reflect padding needs the pad to be smaller than the image; say so in our own terms
    # instead of letting torch raise a bare RuntimeError deep inside a job.
    if pad >= x.shape[-1] or pad >= x.shape[-2]:
        raise GauntletError(
            f"{defense} kernel {kernel} is too large for {x.shape[-2]}x{x.shape[-1]} images"
        )
    return F.pad(x, (pad, pad, pad, pad), mode="reflect")


def gaussian_kernel_1d(sigma: float, kernel: int) -> torch.Tensor:
    """The normalised 1-D Gaussian weights at offsets -kernel//2 .. kernel//2.

    In float64, so the normalisation does not drift; the blur corruptions build their
    2-D kernels from it too (``workers.corruptions``).
    """
    offsets = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


@register_defense
class GaussianBlur(Defense):
    """Gaussian blur: a depthwise convolution with a normalised Gaussian kernel.

    Differentiable, so plain gradient attacks already see through it; it is a baseline.
    """

    name = "gaussian-blur"

    hyperparams = {"sigma": real(1.0, 0.0, 10.0), "kernel": ODD_KERNEL}

    def prepare(self) -> None:
        g = gaussian_kernel_1d(self.sigma, self.kernel)
        # A buffer, not a parameter: it moves with .to(device) and is never trained.
        self.register_buffer("weight", torch.outer(g, g).float(), persistent=False)

    def transform(self, x):
        channels = x.shape[1]
        weight = self.weight.to(x.dtype).expand(channels, 1, self.kernel, self.kernel)
        blurred = F.conv2d(_reflect_pad(x, self.kernel, self.name), weight, groups=channels)
        # The kernel is a convex combination, so this only trims float rounding.
        return blurred.clamp(0.0, 1.0)


@register_defense
class Median(Defense):
    """Median smoothing (Xu et al. 2018 feature squeezing) over kernel x kernel windows.

    Non-differentiable: its gradient picks a single pixel per window, sparse and
    misleading, so adaptive attacks use BPDA instead.
    """

    name = "median"
    differentiable = False

    hyperparams = {"kernel": ODD_KERNEL}

    @torch.no_grad()
    def transform(self, x):
        n, c, h, w = x.shape
        padded = _reflect_pad(x, self.kernel, self.name)
        # unfold mixes channels into one axis; split them back so each channel is its own.
        windows = F.unfold(padded, self.kernel).view(n, c, self.kernel**2, h * w)
        # An odd window size makes torch.median's lower median the true median.
        return windows.median(dim=2).values.view(n, c, h, w)


def _grad(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences with a zero last row/column (Neumann boundary)."""
    gx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1))
    gy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return gx, gy


def _div(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """The divergence, the negative adjoint of ``_grad`` (px, py vanish on the last line)."""
    return px - F.pad(px[..., :, :-1], (1, 0)) + py - F.pad(py[..., :-1, :], (0, 0, 1, 0))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Isotropic total variation per image: the sum of per-channel gradient magnitudes."""
    gx, gy = _grad(x)
    return (gx**2 + gy**2).sqrt().flatten(1).sum(dim=1)


@register_defense
class TotalVariation(Defense):
    """Total-variation minimisation (Guo et al. 2018): min_z ||z - x||^2 + weight * TV(z).

    Solved per channel by Chambolle's (2004) projection algorithm, which needs no
    smoothing of TV and converges at a fixed step; ``steps`` iterations, then [0, 1].
    Non-differentiable in practice (an iterative solver), so adaptive attacks use BPDA.
    """

    name = "tv"
    differentiable = False

    # Chambolle proves convergence for tau <= 1/8; 1/4 is the usual, faster choice in 2-D.
    TAU = 0.25

    hyperparams = {"weight": real(0.03, 0.0, 10.0), "steps": integer(30, 1, 1000)}

    @torch.no_grad()
    def transform(self, x):
        # ||z - x||^2 + w TV(z) = w (||z - x||^2 / (2 lam) + TV(z)) with lam = w / 2: the
        # ROF form Chambolle solves, whose solution is z = x - lam div p.
        lam = self.weight / 2
        px = torch.zeros_like(x)
        py = torch.zeros_like(x)
        for _ in range(self.steps):
            gx, gy = _grad(_div(px, py) - x / lam)
            norm = (gx**2 + gy**2).sqrt()
            px = (px + self.TAU * gx) / (1 + self.TAU * norm)
            py = (py + self.TAU * gy) / (1 + self.TAU * norm)
        return (x - lam * _div(px, py)).clamp(0.0, 1.0)


__all__ = ["GaussianBlur", "Median", "TotalVariation", "gaussian_kernel_1d", "total_variation"]
