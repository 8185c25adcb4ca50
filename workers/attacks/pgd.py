"""Projected gradient descent (Madry et al. 2018), and FGSM as its one-step case.

One class for every norm: the norm axis (``workers.attacks.norms``) supplies the random
start, the step direction and the projection. Examples leave the active set as soon as
the forward pass that computes their gradient shows them misclassified, so an attack on
an undefended model costs a few steps, not ``steps``, per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import NORM, Attack, RunOutput, norm_and_steps
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.hyperparams import Hyper, flag, integer, optional, real


def pgd_family(steps: int, **extra: Hyper) -> dict[str, Hyper]:
    """The PGD family's table: the norm, a step count and a step relative to eps (None:
    derived from the step count in ``prepare``, each attack by its paper's rule), then
    the attack's own ``extra`` hyperparameters, in that order."""
    return norm_and_steps(steps, rel_stepsize=optional(real(None, 0.0, 10.0)), **extra)


@register_attack
class PGD(Attack):
    """PGD with ``steps`` steps of size ``rel_stepsize * eps`` and ``restarts`` restarts.

    The default step is 2.5 * eps / steps (Madry et al. 2018): whatever the step count,
    the path is long enough (2.5 eps) to cross the ball from a random start and back. A
    fixed relative step would leave short runs unable to reach the ball's boundary.
    ``norm=None`` takes the norm from the threat; a fixed norm must match the threat.
    Restarts rerun only on points still robust, each from a fresh random start.
    """

    name = "pgd"

    hyperparams = pgd_family(40, restarts=integer(1, 1, 100), random_start=flag(True))

    def prepare(self) -> None:
        if self.rel_stepsize is None:
            self.rel_stepsize = 2.5 / self.steps
        if self.restarts > 1 and not self.random_start:
            # Without a random start every restart would retrace the same path.
            raise GauntletError("Expected `random_start` to be true when `restarts` > 1")

    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None  # the base checked it
        norm, eps = get_norm(threat.norm), threat.eps
        step_size = self.rel_stepsize * eps
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        active_per_step: list[int] = []
        idx = torch.arange(len(x), device=x.device)  # points still robust
        # On a randomized surface (EOT) one forward pass that misclassifies is a lucky
        # draw, not a success: stopping there leaves the point at the smallest margin,
        # where the next draw classifies it correctly. Such surfaces run every step.
        stop_early = getattr(model, "stop_early", True)
        for _ in range(self.restarts):
            if not len(idx):
                break
            y0, x0 = y[idx], x[idx]
            if self.random_start:
                xa = norm.random_start(x0, eps, generator).clamp_(0.0, 1.0)
            else:
                xa = x0.clone()  # updated in place below, and the ball may hold x0
            # Per-example tensors, compacted together with idx, y0 and xa.
            ball = norm.constraint(x0, eps)
            for _ in range(self.steps):
                xa = xa.detach().requires_grad_(True)
                logits = model(xa)
                # Summed, not averaged: each example's gradient is independent of the
                # batch it happens to share, and there is no tiny-gradient underflow.
                loss = F.cross_entropy(logits, y0, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xa)
                xa = xa.detach()
                active_per_step.append(len(idx))
                # The same forward pass says who is fooled already: they leave the active
                # set with the point that fooled them and are never computed again.
                wrong = logits.detach().argmax(dim=1) != y0
                if not stop_early:
                    wrong = torch.zeros_like(wrong)
                out = wrong.nonzero().squeeze(1)
                if len(out):
                    done = idx[out]
                    x_adv.index_copy_(0, done, xa[out])
                    fooled[done] = True
                # xa owns its memory (a clone, a random start or a gathered copy). Stepping
                # before compacting saves gathering the gradient.
                xa = xa.add_(norm.normalise(grad), alpha=step_size)
                xa = norm.project_clip(xa, ball, eps)
                if len(out):
                    keep = (~wrong).nonzero().squeeze(1)
                    idx, y0, xa, ball = idx[keep], y0[keep], xa[keep], ball[keep]
                    if not len(idx):
                        break
            if not len(idx):
                break
            # The one final forward: the last step's points have not been checked yet.
            with torch.no_grad():
                wrong = model(xa).argmax(dim=1) != y0
            x_adv.index_copy_(0, idx, xa)
            fooled[idx[wrong]] = True
            idx = idx[~wrong]
        return RunOutput(x_adv, fooled, active_per_step)


@register_attack
class FGSM(PGD):
    """The fast gradient (sign) method: one step of size eps from the clean point.

    Linf: x + eps * sign(grad) (Goodfellow et al. 2015). L2: x + eps * grad / ||grad||_2,
    the "fast gradient method". Clipped to [0, 1].
    """

    name = "fgsm"

    hyperparams = {"norm": NORM}

    def prepare(self) -> None:
        self.steps, self.rel_stepsize, self.restarts, self.random_start = 1, 1.0, 1, False
