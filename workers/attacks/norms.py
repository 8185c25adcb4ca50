"""Threat-model norms as a small axis of their own.

Each norm knows three things an iterative attack needs (a random start inside its ball,
how to turn a gradient into a unit step, how to project back onto the ball) plus the
range of eps that makes sense for images in [0, 1]. With that, PGD for Linf and L2 is
one class, and a new norm is one more class here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

# Guards the divisions by a norm: a zero gradient (saturated softmax) or a zero
# perturbation must give a zero step, not NaN.
_TINY = 1e-12


def _uniform(
    shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """U[0, 1) noise drawn from ``generator`` on its own device, moved next to ``like``.

    Drawing on the generator's device keeps a seed's stream the same whether the attack
    runs on CPU or GPU.
    """
    device = generator.device if generator is not None else like.device
    noise = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


def _normal(
    shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


def _flat_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norms, shaped (n, 1, 1, ...) to broadcast against ``t``."""
    norms = t.flatten(1).norm(p=2, dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1)))


class Norm:
    """The geometry of one threat model. Stateless; one shared instance per norm."""

    name: ClassVar[str]
    max_eps: ClassVar[float]

    def random_start(
        self, x: torch.Tensor, eps: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """A random point in the eps-ball around ``x`` (not yet clipped to [0, 1])."""
        raise NotImplementedError

    def normalise(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit size in this norm."""
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        """The closest point to ``x_adv`` in the eps-ball around ``x``."""
        raise NotImplementedError

    # The inner loop of an iterative attack runs project-and-clip every step on every
    # active example; these two let a norm precompute what it needs once per example, as
    # one tensor (compacted along with the active set at the cost of one gather), and
    # update in place.
    def constraint(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """A per-example tensor (first dim n) that ``project_clip`` needs."""
        return x

    def project_clip(self, x_adv: torch.Tensor, constraint: torch.Tensor, eps: float):
        """A point of the eps-ball that is also in [0, 1]; may overwrite ``x_adv``."""
        return self.project(x_adv, constraint, eps).clamp_(0.0, 1.0)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example distance in this norm, shape (n,)."""
        raise NotImplementedError

    def check_eps(self, eps: object) -> str | None:
        """None if ``eps`` is valid for this norm, else the reason it is not."""
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            return f"a float, but got {eps!r} of type {type(eps).__name__}"
        if not math.isfinite(eps) or not 0 < eps <= self.max_eps:
            return f"a float in (0, {self.max_eps:g}] for the {self.name} threat, but got {eps!r}"
        return None


class LinfNorm(Norm):
    name = "linf"
    # Pixels live in [0, 1]: eps = 1 already allows every image.
    max_eps = 1.0

    def random_start(self, x, eps, generator):
        return x + (2 * _uniform(x.shape, x, generator) - 1) * eps

    def normalise(self, grad):
        return grad.sign()

    def project(self, x_adv, x, eps):
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps)

    def constraint(self, x, eps):
        # Ball and [0, 1] are both boxes: their intersection is one box, and projecting
        # onto it is a single clamp. Low and high corners side by side in dim 1.
        return torch.cat(((x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)), dim=1)

    def project_clip(self, x_adv, constraint, eps):
        low, high = constraint.chunk(2, dim=1)
        return x_adv.clamp_(low, high)

    def distance(self, x_adv, x):
        return (x_adv - x).flatten(1).abs().amax(dim=1)


class L2Norm(Norm):
    name = "l2"
    # The L2 diameter of [0, 1]^d is sqrt(d): 1000 covers inputs up to 1,000,000 values
    # (3x224x224 is about 150,000), anything larger is a typo for a much smaller number.
    max_eps = 1000.0

    def random_start(self, x, eps, generator):
        # Uniform in the ball: a Gaussian direction (uniform on the sphere) with radius
        # eps * u^(1/d), since the volume inside radius r grows like r^d.
        direction = _normal(x.shape, x, generator)
        direction = direction / _flat_norms(direction).clamp_min(_TINY)
        d = x[0].numel()
        radius = eps * _uniform(torch.Size([x.shape[0]]), x, generator).pow(1.0 / d)
        return x + direction * radius.view(-1, *([1] * (x.dim() - 1)))

    def normalise(self, grad):
        return grad / _flat_norms(grad).clamp_min(_TINY)

    def project(self, x_adv, x, eps):
        delta = x_adv - x
        # Scale down only what lies outside; inside the ball the factor is exactly 1.
        factor = (eps / _flat_norms(delta).clamp_min(_TINY)).clamp_max(1.0)
        return x + delta * factor

    def distance(self, x_adv, x):
        return (x_adv - x).flatten(1).norm(p=2, dim=1)


NORMS: dict[str, Norm] = {norm.name: norm for norm in (LinfNorm(), L2Norm())}


def get_norm(name: str) -> Norm:
    """The norm called ``name``; KeyError for others (callers validate first)."""
    return NORMS[name]
