"""DeepFool (Moosavi-Dezfooli et al. 2016): walk to the nearest linearised boundary.

A minimal-perturbation attack: it ignores eps while searching, and finds a small
perturbation that changes the label. Under a threat model the point it finds is
projected onto the eps-ball, and a forward pass on the projection decides whether the
example counts as fooled. ``minimal`` exposes the unbounded search itself, for
perturbation-size statistics.
"""

from __future__ import annotations

import torch

from gauntlet.workers.attacks.base import Attack, RunOutput, judged_in_ball, norm_and_steps
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.hyperparams import integer, span

# Guards divisions by ||w_k||: a flat logit difference gives an infinite distance (never
# the chosen boundary) instead of NaN.
_TINY = 1e-12
# Added to |f_k| as in the reference implementation, so a point sitting exactly on the
# boundary still takes a step across it.
_NUDGE = 1e-4


def _per_example(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


@register_attack
class DeepFool(Attack):
    """DeepFool for the L2 norm, and its Linf variant (the paper's l_p generalisation).

    Each step linearises the logit differences f_k = z_k - z_y of the ``candidates``
    classes with the largest clean logits and moves to the closest boundary:
    r = (|f_k| + 1e-4) / ||w_k||_2^2 * w_k (L2) or (|f_k| + 1e-4) / ||w_k||_1 * sign(w_k)
    (Linf). The point tried is x + (1 + ``overshoot``) * sum(r), clipped to [0, 1].
    Costs candidates - 1 backward passes per step; examples leave once misclassified.
    """

    name = "deepfool"

    # Two ``candidates`` at least: the label and one boundary to cross.
    hyperparams = norm_and_steps(
        50, overshoot=span(0.02, 0.0, 10.0), candidates=integer(10, 2, 100_000)
    )

    def minimal(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, found): the unbounded DeepFool points, and where they are misclassified.

        ``norm`` defaults to the attack's own, else L2. The model should be in eval mode.
        """
        x_adv, _, _ = self._search(model, x, y, norm or self.norm or "l2")
        # One pass over the returned points decides, as for ``run``: the search judged
        # each point on the sub-batch still active, and a point left just past the
        # boundary can fall back across it when the whole batch is evaluated together.
        with torch.no_grad():
            found = model(x_adv).argmax(dim=1) != y
        return x_adv, found

    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None  # the base checked it
        # On a random surface (EOT) the first pass past the boundary may be a lucky draw,
        # and a point just past it is a coin flip: there the search keeps stepping, inside
        # the ball, for all its steps (``within``), pushing further across.
        within = None if getattr(model, "stop_early", True) else threat.eps
        x_min, _, counts = self._search(model, x, y, threat.norm, within)
        return RunOutput(*judged_in_ball(model, x_min, x, y, threat.norm, threat.eps), counts)

    def _search(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        norm: str,
        within: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(x_adv, found, active_per_step). ``within`` given: no example leaves early, the
        total perturbation stays in the ``within`` ball, and the last pass judges."""
        x_adv = x.detach().clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        counts: list[int] = []
        with torch.no_grad():
            clean = model(x)
        num_others = min(self.candidates, clean.shape[1]) - 1
        if num_others < 1:
            return x_adv, found, counts  # a one-class model has no boundary to cross
        # The candidate boundaries are fixed at the clean point, as in the paper: the top
        # classes other than y, most likely first.
        rows = torch.arange(len(x), device=x.device)
        others = clean.masked_fill(_one_hot(y, clean), -torch.inf).topk(num_others, dim=1)[1]

        idx, x0, y0 = rows, x.detach(), y
        r_tot = torch.zeros_like(x0)
        xa = x0.clone()
        # steps + 1 forward passes: the last one only checks the last step's points.
        for step in range(self.steps + 1):
            xa = xa.detach().requires_grad_(True)
            logits = model(xa)
            done = logits.detach().argmax(dim=1) != y0
            if within is not None:
                x_adv[idx], found[idx] = xa.detach(), done
                done = torch.zeros_like(done)
            elif done.any():
                out = done.nonzero().squeeze(1)
                x_adv[idx[out]] = xa.detach()[out]
                found[idx[out]] = True
            keep = (~done).nonzero().squeeze(1)
            if step == self.steps or not len(keep):
                break
            f_y = logits.gather(1, y0[:, None])
            f = logits.gather(1, others) - f_y  # (m, candidates - 1), negative while correct
            r = self._step(f, xa, keep, norm, len(idx), counts)
            idx, x0, y0, others = idx[keep], x0[keep], y0[keep], others[keep]
            r_tot = r_tot[keep] + r
            if within is not None:
                r_tot = get_norm(norm).project(x0 + r_tot, x0, within) - x0
            xa = (x0 + (1.0 + self.overshoot) * r_tot).clamp_(0.0, 1.0)
        return x_adv, found, counts

    def _step(
        self,
        f: torch.Tensor,
        xa: torch.Tensor,
        keep: torch.Tensor,
        norm: str,
        batch: int,
        counts: list[int],
    ) -> torch.Tensor:
        """The step to the closest linearised boundary, for the ``keep`` rows of ``xa``.

        One backward per candidate, keeping only the best boundary so far: memory stays
        at a few copies of the batch instead of (candidates x batch) gradients.
        """
        num_others = f.shape[1]
        best_dist = torch.full((len(keep),), torch.inf, device=xa.device, dtype=xa.dtype)
        best_f = torch.zeros_like(best_dist)
        best_w = torch.zeros_like(xa[keep])
        best_norm = torch.ones_like(best_dist)
        for k in range(num_others):
            # Rows are independent in eval mode: the summed row's gradient is per example.
            (grad,) = torch.autograd.grad(f[:, k].sum(), xa, retain_graph=k < num_others - 1)
            counts.append(batch)
            w = grad[keep]
            fk = f[keep, k].detach().abs()
            flat = w.flatten(1)
            wnorm = flat.norm(dim=1) if norm == "l2" else flat.abs().sum(dim=1)
            dist = fk / wnorm.clamp_min(_TINY)
            closer = dist < best_dist
            best_dist = torch.where(closer, dist, best_dist)
            best_f = torch.where(closer, fk, best_f)
            best_norm = torch.where(closer, wnorm, best_norm)
            best_w = torch.where(_per_example(closer, w), w, best_w)
        wn = best_norm.clamp_min(_TINY)
        if norm == "l2":
            return _per_example((best_f + _NUDGE) / wn**2, best_w) * best_w
        return _per_example((best_f + _NUDGE) / wn, best_w) * best_w.sign()


def _one_hot(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, like.shape[1]).bool()
