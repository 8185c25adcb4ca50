"""Iterative gradient-sign attacks around PGD: BIM, MI-FGSM, R+FGSM and targeted PGD.

Untargeted BIM is PGD without a random start and reuses PGD's loop unchanged. The
others need what that loop has no hook for (a per-example momentum buffer, a target per
example, a start that is not uniform in the ball), so they share ``iterate`` below: the
same active-set loop, generalised. Examples leave it at the forward pass that shows them
done (misclassified, or on their target), and never cost another gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import NORM, RunOutput
from gauntlet.workers.attacks.norms import Norm, get_norm
from gauntlet.workers.attacks.pgd import PGD, pgd_family
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.attacks.targets import TARGET, pick_targets, reached
from gauntlet.workers.hyperparams import Hyper, flag, span

# A zero gradient (saturated softmax) must give a zero momentum update, not NaN.
_TINY = 1e-12


def _open_unit(name: str, value) -> float:
    # Open at both ends: 0 is FGSM (registered as such), 1 leaves no gradient step.
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and 0.0 < value < 1.0):
        raise GauntletError(f"Expected `{name}` to be a float in (0, 1), but got {value!r}")
    return float(value)


def iterate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm,
    eps: float,
    *,
    start: torch.Tensor,
    steps: int,
    step_size: float,
    momentum: float | None = None,
    targets: torch.Tensor | None = None,
) -> RunOutput:
    """Signed (Linf) or normalised (L2) gradient steps from ``start``, projected each step.

    ``targets`` given: descend the cross-entropy to the target, and an example is done
    when it is classified as its target. ``momentum`` given: step along the accumulated
    L1-normalised gradients (Dong et al. 2018). ``start`` must lie in the ball and [0, 1]
    and is overwritten. ``fooled`` is misclassification, what robust accuracy needs.
    """
    x_adv = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    active_per_step: list[int] = []
    idx = torch.arange(len(x), device=x.device)
    xa, y0, t0 = start, y, targets
    ball = norm.constraint(x, eps)
    velocity = torch.zeros_like(x) if momentum is not None else None
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        logits = model(xa)
        # Summed, as in PGD: per-example gradients independent of the batch.
        if t0 is None:
            loss = F.cross_entropy(logits, y0, reduction="sum")
        else:
            loss = -F.cross_entropy(logits, t0, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xa)
        xa = xa.detach()
        active_per_step.append(len(idx))
        done = reached(logits.detach(), y0, t0)
        if not getattr(model, "stop_early", True):
            done = torch.zeros_like(done)  # a random surface: see PGD.run
        out = done.nonzero().squeeze(1)
        if len(out):
            x_adv.index_copy_(0, idx[out], xa[out])
            fooled[idx[out]] = True  # a target is never y, so hitting it misclassifies
        direction = grad
        if velocity is not None:
            # L1-normalising each gradient keeps steps of very different gradient scale
            # comparable, so the buffer is a direction average, not a magnitude contest.
            l1 = grad.flatten(1).abs().sum(dim=1).clamp_min(_TINY)
            velocity.mul_(momentum).add_(grad / l1.view(-1, *([1] * (grad.dim() - 1))))
            direction = velocity
        xa = xa.add_(norm.normalise(direction), alpha=step_size)
        xa = norm.project_clip(xa, ball, eps)
        if len(out):
            keep = (~done).nonzero().squeeze(1)
            idx, y0, xa, ball = idx[keep], y0[keep], xa[keep], ball[keep]
            t0 = t0[keep] if t0 is not None else None
            velocity = velocity[keep] if velocity is not None else None
            if not len(idx):
                break
    if len(idx):
        # The last step's points have not been seen by the model yet.
        with torch.no_grad():
            wrong = model(xa).argmax(dim=1) != y0
        x_adv.index_copy_(0, idx, xa)
        fooled[idx] = wrong
    return RunOutput(x_adv, fooled, active_per_step)


@register_attack
class BIM(PGD):
    """The basic iterative method / I-FGSM (Kurakin et al. 2017): PGD from the clean point.

    Default step 1.25 * eps / steps: Kurakin et al. take steps of 1/255 for
    min(eps + 4, 1.25 eps) steps (eps in 1/255 units), a path about 1.25 eps long, enough
    to reach the boundary of the ball even when some steps zig-zag. ``targeted`` descends
    the cross-entropy to a ``target`` class instead ("least-likely" is their ILLC).
    """

    name = "bim"

    hyperparams = pgd_family(10, targeted=flag(False), target=TARGET)

    def prepare(self) -> None:
        if self.rel_stepsize is None:
            self.rel_stepsize = 1.25 / self.steps
        self.restarts, self.random_start = 1, False
        super().prepare()

    def run(self, model, x, y, threat, generator) -> RunOutput:
        if not self.targeted:
            return super().run(model, x, y, threat, generator)
        return self._iterate(model, x, y, threat, generator, start=x.clone(), momentum=None)

    def _iterate(self, model, x, y, threat, generator, *, start, momentum) -> RunOutput:
        assert threat is not None  # the base checked it
        targets = pick_targets(model, x, y, self.target, generator) if self.targeted else None
        return iterate(
            model,
            x,
            y,
            get_norm(threat.norm),
            threat.eps,
            start=start,
            steps=self.steps,
            step_size=self.rel_stepsize * threat.eps,
            momentum=momentum,
            targets=targets,
        )


@register_attack
class MIFGSM(BIM):
    """Momentum iterative FGSM (Dong et al. 2018): BIM stepping along a momentum buffer.

    g <- momentum * g + grad / ||grad||_1, then a signed (Linf) or L2-normalised step of
    eps / steps, the paper's alpha = eps / T: with momentum the path keeps its direction,
    so it needs no 1.25 slack. ``momentum=0`` is BIM with that step.
    """

    name = "mi-fgsm"

    hyperparams = pgd_family(10, momentum=span(1.0, 0.0, 10.0), targeted=flag(False), target=TARGET)

    def prepare(self) -> None:
        if self.rel_stepsize is None:
            self.rel_stepsize = 1.0 / self.steps
        super().prepare()

    def run(self, model, x, y, threat, generator) -> RunOutput:
        return self._iterate(
            model, x, y, threat, generator, start=x.clone(), momentum=self.momentum
        )


@register_attack
class PGDTargeted(PGD):
    """Targeted PGD: from a random start, descend the cross-entropy to a target class."""

    name = "pgd-targeted"

    hyperparams = pgd_family(40, random_start=flag(True), target=TARGET)

    def prepare(self) -> None:
        self.restarts = 1
        super().prepare()

    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None
        norm, eps = get_norm(threat.norm), threat.eps
        # Targets first, then the start: the generator's stream has one fixed order.
        targets = pick_targets(model, x, y, self.target, generator)
        if self.random_start:
            start = norm.random_start(x, eps, generator).clamp_(0.0, 1.0)
        else:
            start = x.clone()
        step_size = self.rel_stepsize * eps
        return iterate(
            model,
            x,
            y,
            norm,
            eps,
            start=start,
            steps=self.steps,
            step_size=step_size,
            targets=targets,
        )


@register_attack
class RFGSM(PGD):
    """R+FGSM (Tramer et al. 2018): a random step, then FGSM with what is left of eps.

    x' = x + alpha * sign(N(0, I)) (L2: alpha times a random unit direction), clipped to
    [0, 1], then one gradient step of eps - alpha. The random step escapes the sharp
    curvature right at the data points that makes single-step adversarial training mask
    FGSM's gradient. ``rel_alpha`` = alpha / eps, 0.5 in the paper.
    """

    name = "r-fgsm"

    hyperparams = {"norm": NORM, "rel_alpha": Hyper(0.5, _open_unit)}

    def prepare(self) -> None:
        self.steps, self.rel_stepsize = 1, 1.0 - self.rel_alpha
        self.restarts, self.random_start = 1, False
        super().prepare()

    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None
        norm, eps = get_norm(threat.norm), threat.eps
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        start = x + self.rel_alpha * eps * norm.normalise(noise.to(x.device))
        # |random step| + |gradient step| = eps: the projection inside is only a clip.
        return iterate(
            model,
            x,
            y,
            norm,
            eps,
            start=start.clamp_(0.0, 1.0),
            steps=1,
            step_size=(1.0 - self.rel_alpha) * eps,
        )
