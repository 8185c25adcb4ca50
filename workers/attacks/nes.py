"""NES (Ilyas et al. 2018): PGD on a gradient estimated from model outputs alone.

The estimate is 1/(n sigma) sum_i delta_i L(x + sigma delta_i) over n Gaussian directions
taken in antithetic pairs (delta and -delta): each pair is a central finite difference
along a random direction, which cancels the constant and even-order terms of L and so
needs far fewer samples than independent draws for the same accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.attacks.square import margin
from gauntlet.workers.hyperparams import expect_int, integer, one_of, optional, real

_LOSSES = ("margin", "ce")
# Inputs per forward pass of the estimator (in values, not images): bounds its memory
# whatever the image size, while small images still go in one pass.
_CHUNK_VALUES = 1 << 25

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def estimate_gradient(
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int,
    sigma: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """NES estimate of the gradient of ``loss_fn`` at each point of ``x``.

    ``loss_fn(points, labels)`` returns one loss per point; it is called on batches of
    ``x`` shifted along ``samples // 2`` antithetic pairs of directions per point, so
    each point costs exactly ``samples`` evaluations.
    """
    pairs = samples // 2
    per_chunk = max(1, _CHUNK_VALUES // max(1, 2 * x.numel()))
    grad = torch.zeros_like(x)
    for start in range(0, pairs, per_chunk):
        k = min(per_chunk, pairs - start)
        u = torch.randn((k, *x.shape), generator=generator, device=generator.device)
        u = u.to(x.device, x.dtype)
        points = torch.cat((x + sigma * u, x - sigma * u)).flatten(0, 1)
        losses = loss_fn(points, y.repeat(2 * k)).view(2, k, len(x))
        diff = (losses[0] - losses[1]).view(k, len(x), *([1] * (x.dim() - 1)))
        grad += (u * diff).sum(dim=0)
    return grad / (2 * pairs * sigma)


def output_loss(kind: str, model: torch.nn.Module) -> LossFn:
    """The loss to maximise, from logits only: the negated margin or cross-entropy."""
    if kind == "margin":
        return lambda points, labels: -margin(model(points), labels)
    return lambda points, labels: F.cross_entropy(model(points), labels, reduction="none")


@register_attack
class NES(Attack):
    """NES gradient estimation with ``samples`` queries per step, plus one to check.

    ``steps=None`` takes as many steps as the ``queries`` budget allows; otherwise the run
    stops at ``steps`` or at the budget, whichever comes first. The step is
    ``rel_stepsize * eps`` along the sign (Linf) or the normalised estimate (L2),
    defaulting to 2.5 * eps / steps as PGD does. The queries at x + sigma delta are not
    clipped to [0, 1]: clipping would bias the estimate at saturated pixels, and what is
    estimated is the gradient a white-box attack would use. Examples leave once the check
    after a step shows them misclassified (on a random surface, never: see ``run``).
    """

    name = "nes"
    black_box = True

    hyperparams = {
        "samples": integer(50, 2, 100_000),
        "sigma": real(0.001, 0.0, 1.0),
        "queries": integer(10_000, 1, 10_000_000),
        "steps": optional(integer(1, 1, 100_000)),
        "rel_stepsize": optional(real(None, 0.0, 10.0)),
        "loss": one_of("margin", _LOSSES),
    }

    def prepare(self) -> None:
        if self.samples % 2:
            raise GauntletError(
                f"Expected `samples` to be even (antithetic pairs), but got {self.samples!r}"
            )
        # A budget must pay for at least one estimate and the check after its step.
        expect_int("queries", self.queries, self.samples + 1, 10_000_000)

    @property
    def effective_steps(self) -> int:
        """Steps the budget allows: each costs ``samples`` estimates and one check."""
        affordable = self.queries // (self.samples + 1)
        return affordable if self.steps is None else min(self.steps, affordable)

    @torch.no_grad()
    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None  # the base checked it
        norm, eps = get_norm(threat.norm), threat.eps
        steps = self.effective_steps
        rel = self.rel_stepsize if self.rel_stepsize is not None else 2.5 / steps
        loss_fn = output_loss(self.loss, model)
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        queries = torch.zeros(len(x), dtype=torch.int64, device=x.device)
        idx = torch.arange(len(x), device=x.device)
        xa, y0, ball = x.clone(), y, norm.constraint(x, eps)
        # On a random surface (EOT) a misclassifying check may be a lucky draw: every
        # example spends the whole budget, and the last check judges the last point.
        stop_early = getattr(model, "stop_early", True)
        wrong = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(steps):
            grad = estimate_gradient(loss_fn, xa, y0, self.samples, self.sigma, generator)
            xa = norm.project_clip(xa + rel * eps * norm.normalise(grad), ball, eps)
            wrong = model(xa).argmax(dim=1) != y0
            queries[idx] += self.samples + 1
            if stop_early and wrong.any():
                done = wrong.nonzero().squeeze(1)
                x_adv[idx[done]] = xa[done]
                fooled[idx[done]] = True
                keep = (~wrong).nonzero().squeeze(1)
                idx, xa, y0, ball = idx[keep], xa[keep], y0[keep], ball[keep]
                if not len(idx):
                    break
        x_adv[idx] = xa
        if not stop_early:
            fooled[idx] = wrong
        return RunOutput(x_adv, fooled, [], queries)
