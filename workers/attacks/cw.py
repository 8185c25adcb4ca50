"""Carlini & Wagner's L2 attack (2017): the smallest perturbation found by optimisation.

minimise ||x' - x||_2^2 + c * max(max_{i != t} Z_i - Z_t, -kappa) over x' = (tanh(w) + 1) / 2
(the tanh keeps x' in [0, 1] without clipping), with Adam, and a per-example binary search
on c: success lowers c (a smaller perturbation may do), failure raises it.

Under a threat ball the search stops for an example as soon as it has an adversarial
point within eps; the best point found is projected onto the ball and a forward pass on
the projection decides whether the example counts as fooled. ``minimal`` runs the full,
unbounded search for perturbation-size statistics.
"""

from __future__ import annotations

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import Attack, RunOutput, Threat, judged_in_ball
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.attacks.targets import TARGET, pick_targets
from gauntlet.workers.hyperparams import flag, integer, real, span

# Adam's constants, as in torch.optim.Adam; the update is written out so that its state
# can be compacted together with the active set.
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
# atanh(+-1) is infinite: pixels at 0 or 1 start just inside (the reference code's factor).
_BOX = 1.0 - 1e-6
# Above this, the upper bound on c is still "none found" (the reference code's 1e10).
_NO_BOUND = 1e10


@register_attack
class CarliniWagnerL2(Attack):
    """CW-L2 with Adam (``lr``), ``binary_steps`` searches of ``steps`` iterations each.

    The paper runs 9 binary steps of up to 10,000 iterations from c = 1e-3; our defaults
    (5 x 1000 from c = 1e-2, lr 0.01) are cleverhans'. Fewer steps are not just noisier:
    a pixel at 0 or 1 starts at atanh(+-0.999999) = +-7.25 in tanh space and Adam moves
    it about ``lr`` per step, so on images with saturated pixels (digits, MNIST) 100 steps
    at lr 0.01 leave much of the image frozen; raise ``lr`` (0.1) for a short run.
    ``abort_early`` stops an example's search at the current c when its loss has not
    dropped by 0.01% over steps / 10 iterations. ``targeted`` aims at ``target``
    classes; success is still counted as misclassification.
    """

    name = "cw-l2"

    hyperparams = {
        "steps": integer(1000, 1, 100_000),
        "binary_steps": integer(5, 1, 50),
        "initial_const": real(1e-2, 0.0, 1e6),
        "lr": real(0.01, 0.0, 10.0),
        "confidence": span(0.0, 0.0, 1e6),
        "abort_early": flag(True),
        "targeted": flag(False),
        "target": TARGET,
    }

    def check(self, threat: Threat | None) -> None:
        if threat is not None and threat.norm != "l2":
            raise GauntletError(f"{self!r} attacks the l2 norm, but the threat is {threat.norm}")

    def minimal(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, found): the smallest adversarial points found, x where none was.

        The model should be in eval mode; ``generator`` draws "random" targets.
        """
        targets = pick_targets(model, x, y, self.target, generator) if self.targeted else None
        x_adv, found, _ = self._search(model, x, y, targets, within=None)
        return x_adv, found

    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None  # the base checked it
        targets = pick_targets(model, x, y, self.target, generator) if self.targeted else None
        # On a random surface (EOT) a success at the smallest L2 sits on the boundary,
        # where the next draw classifies it right: there the search spends its whole
        # budget and keeps, per example, the success inside the ball with the largest
        # margin (``keep_margin``).
        keep_margin = not getattr(model, "stop_early", True)
        best, _, counts = self._search(
            model, x, y, targets, within=threat.eps, keep_margin=keep_margin
        )
        return RunOutput(*judged_in_ball(model, best, x, y, "l2", threat.eps), counts)

    def _search(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        within: float | None,
        keep_margin: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(best_adv, found, active_per_step); ``within``: stop at an L2 of at most this.

        ``keep_margin`` (with ``within``): never stop early; best_adv is the success
        within the ball with the largest margin, else the smallest-L2 success.
        """
        n = len(x)
        x = x.detach()
        labels = targets if targets is not None else y
        w0 = torch.atanh((2.0 * x - 1.0) * _BOX)
        const = torch.full((n,), self.initial_const, device=x.device, dtype=x.dtype)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, _NO_BOUND)
        best_l2 = torch.full_like(const, torch.inf)
        best_adv = x.clone()
        counts: list[int] = []
        goal = within**2 if within is not None else -1.0  # squared: compared with l2sq
        # Margin of the best success inside the ball, per example (keep_margin only).
        inside = torch.full_like(const, -torch.inf) if keep_margin else None
        inside_adv = x.clone()
        for _ in range(self.binary_steps):
            todo = (best_l2 > (-1.0 if keep_margin else goal)).nonzero().squeeze(1)
            if not len(todo):
                break
            hit, spent = self._optimise(
                model, x, labels, w0, const, todo, best_l2, best_adv, goal, (inside, inside_adv)
            )
            counts.extend(spent)
            # The reference code's update: bisect once an upper bound exists, else x10.
            upper[todo[hit]] = torch.minimum(upper[todo[hit]], const[todo[hit]])
            lower[todo[~hit]] = torch.maximum(lower[todo[~hit]], const[todo[~hit]])
            bounded = upper[todo] < _NO_BOUND
            const[todo] = torch.where(bounded, (lower[todo] + upper[todo]) / 2, const[todo] * 10.0)
        if inside is not None:
            best_adv = torch.where(torch.isfinite(inside).view(-1, 1, 1, 1), inside_adv, best_adv)
        return best_adv, torch.isfinite(best_l2), counts

    def _optimise(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        labels: torch.Tensor,
        w0: torch.Tensor,
        const: torch.Tensor,
        todo: torch.Tensor,
        best_l2: torch.Tensor,
        best_adv: torch.Tensor,
        goal: float,
        margins: tuple[torch.Tensor | None, torch.Tensor],
    ) -> tuple[torch.Tensor, list[int]]:
        """One Adam run at fixed c for the ``todo`` examples; updates the bests in place.

        ``margins``: (best margin inside the ball, its point), updated in place, or
        (None, _) to stop examples once they succeed inside the ball.
        Returns (success anywhere in the run, per example of todo; active per step).
        """
        inside, inside_adv = margins
        success = torch.zeros(len(todo), dtype=torch.bool, device=x.device)
        counts: list[int] = []
        pos = torch.arange(len(todo), device=x.device)  # positions in todo still running
        j = todo
        x0, w, lab, c = x[j], w0[j], labels[j], const[j]
        mod = torch.zeros_like(x0)
        m, v = torch.zeros_like(x0), torch.zeros_like(x0)
        prev = torch.full_like(c, torch.inf)
        every = max(self.steps // 10, 1)
        for step in range(self.steps):
            mod.requires_grad_(True)
            xn = (torch.tanh(w + mod) + 1.0) / 2.0
            logits = model(xn)
            l2sq = (xn - x0).flatten(1).pow(2).sum(dim=1)
            z_lab = logits.gather(1, lab[:, None]).squeeze(1)
            mask = torch.nn.functional.one_hot(lab, logits.shape[1]).bool()
            z_other = logits.masked_fill(mask, -torch.inf).amax(dim=1)
            # margin > 0 means the attack's goal is met with room to spare.
            margin = (z_lab - z_other) if self.targeted else (z_other - z_lab)
            loss = l2sq + c * (-margin).clamp_min(-self.confidence)
            (grad,) = torch.autograd.grad(loss.sum(), mod)
            counts.append(len(j))
            with torch.no_grad():
                pred = logits.argmax(dim=1)
                reached = (pred == lab) if self.targeted else (pred != lab)
                ok = reached & (margin >= self.confidence)
                success[pos[ok]] = True
                better = ok & (l2sq < best_l2[j])
                best_l2[j[better]] = l2sq[better]
                best_adv[j[better]] = xn[better]
                if inside is not None:
                    gain = ok & (l2sq <= goal) & (margin > inside[j])
                    inside[j[gain]] = margin[gain]
                    inside_adv[j[gain]] = xn[gain]
                t = step + 1
                m.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
                v.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
                m_hat, v_hat = m / (1 - _BETA1**t), v / (1 - _BETA2**t)
                mod = mod.detach() - self.lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
                # keep_margin: a random surface's loss is noisy, so no early stop at all.
                stay = best_l2[j] > (-1.0 if inside is not None else goal)
                if self.abort_early and inside is None and step % every == 0:
                    current = loss.detach()
                    stay &= ~(current > prev * 0.9999)
                    prev = current
            if not stay.all():
                keep = stay.nonzero().squeeze(1)
                if not len(keep):
                    break
                pos, j, x0, w, lab, c = pos[keep], j[keep], x0[keep], w[keep], lab[keep], c[keep]
                mod, m, v, prev = mod[keep], m[keep], v[keep], prev[keep]
        return success, counts
