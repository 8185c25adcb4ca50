"""Targeted FAB (Croce & Hein 2020): the fast adaptive boundary attack, FAB-T.

FAB looks for the smallest perturbation that changes the decision: it linearises the
boundary between the true class and a target class, steps onto it (a little past it),
and biases each step back towards the clean input so the point found stays close.
After each success it steps back towards the clean input and tries again, closer.
Unlike the loss-based attacks it needs no step size, and it is not fooled by a loss
whose gradient vanishes, which makes it a useful member of the AutoAttack ensemble.

For a robustness evaluation a point only counts as fooled within eps: an example leaves
the active batch once it has an adversarial point inside the ball (on a randomized
surface, ``stop_early = False``, it runs every step and keeps its best such point).
"""

from __future__ import annotations

import torch

from gauntlet.workers.attacks.base import Attack, RunOutput, norm_and_steps
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.attacks.stacking import Stack, chunk_size
from gauntlet.workers.hyperparams import integer, real, span

_TINY = 1e-12


def box_hyperplane_projection(
    t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str
) -> torch.Tensor:
    """The smallest ``d`` (in ``norm``, "linf" or "l2") with w.(t + d) = b and t + d in [0, 1].

    Rows are independent problems: t, w (n, k), b (n,). Where the box cannot reach the
    hyperplane, ``d`` goes to the box corner that gets closest.

    Moving each coordinate only in the helpful direction, by at most its room to the
    box's face, the optimum is d_i = min(lam * q_i, room_i) (in that direction) with
    q_i = 1 for Linf (every coordinate moves by lam until it hits the box) and
    q_i = |w_i| for L2 (the KKT conditions: d proportional to w, clipped). The progress
    sum_i |w_i| d_i is piecewise linear and increasing in lam, with a kink where each
    coordinate saturates: sort the kinks, find the segment that reaches b, solve on it.
    """
    gap = b - (w * t).sum(dim=1)
    # Orient each hyperplane so that the progress needed is positive.
    w = w * gap.sign()[:, None]
    gap = gap.abs()
    aw = w.abs()
    room = torch.where(w > 0, 1 - t, t)
    q = torch.ones_like(aw) if norm == "linf" else aw
    kink = torch.where(q > 0, room / q.clamp_min(_TINY), torch.zeros_like(q))
    kink, order = kink.sort(dim=1)
    aw_s, q_s, room_s = aw.gather(1, order), q.gather(1, order), room.gather(1, order)
    # At the k-th kink the first k+1 coordinates are saturated (progress `full`), the
    # others move at rate `slope` per unit of lam.
    full = (aw_s * room_s).cumsum(dim=1)
    rate = aw_s * q_s
    slope = rate.sum(dim=1, keepdim=True) - rate.cumsum(dim=1)
    progress = full + kink * slope
    k = (progress < gap[:, None]).sum(dim=1, keepdim=True)  # kinks passed before b
    feasible = k.squeeze(1) < progress.shape[1]
    prev = (k - 1).clamp_min(0)
    full_before = torch.where(k > 0, full.gather(1, prev), torch.zeros_like(gap[:, None]))
    slope_before = torch.where(k > 0, slope.gather(1, prev), rate.sum(dim=1, keepdim=True))
    lam = (gap[:, None] - full_before) / slope_before.clamp_min(_TINY)
    # Unreachable: a lam past the last kink saturates every coordinate (the corner).
    lam = torch.where(feasible[:, None], lam, kink[:, -1:])
    return w.sign() * torch.minimum(lam * q, room)


def _margin_grad(model, x, y, target):
    """(margin of ``target`` over ``y``, its gradient, the logits) at ``x``."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    # The target's margin over the true class: the boundary is where it is 0.
    rows = torch.arange(len(x), device=x.device)
    margin = logits[rows, target] - logits[rows, y]
    (grad,) = torch.autograd.grad(margin.sum(), x)
    return margin.detach(), grad, logits.detach()


def _distance(norm: str, d: torch.Tensor) -> torch.Tensor:
    """Per-row norms of a flat (n, k) tensor."""
    return d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)


@register_attack
class FABT(Attack):
    """Targeted FAB against each of the ``n_target_classes`` most likely wrong classes.

    The defaults are the AutoAttack "standard" configuration. ``alpha_max`` caps the
    bias towards the clean input, ``eta`` overshoots the linearised boundary, ``beta``
    is the step back towards the clean input after a success. Restarts after the first
    start at random in half the ball (the first starts at the clean input).
    ``stack_rows`` > 0 runs several targets in one batch of at most that many rows (see
    ``stacking``); 0 runs one target at a time.
    """

    name = "fab-t"

    # ``eta`` is at least 1: stopping short of the linearised boundary would never cross it.
    hyperparams = norm_and_steps(
        100,
        restarts=integer(1, 1, 100),
        n_target_classes=integer(9, 1, 1000),
        alpha_max=real(0.1, 0.0, 1.0),
        eta=span(1.05, 1.0, 10.0),
        beta=real(0.9, 0.0, 1.0),
        stack_rows=integer(0, 0, 1_000_000),
    )

    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None  # the base checked it
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        active_per_step: list[int] = []
        with torch.no_grad():
            ranked = model(x).argsort(dim=1, descending=True)
        idx = torch.arange(len(x), device=x.device)  # points still robust
        # Rank 0 is the true class (run() only sees correctly classified points).
        ranks = list(range(1, min(self.n_target_classes, ranked.shape[1] - 1) + 1))
        while ranks and len(idx):
            k = chunk_size(len(idx), len(ranks), self.stack_rows)
            chunk, ranks = ranks[:k], ranks[k:]
            if k == 1:
                for restart in range(self.restarts):
                    if not len(idx):
                        break
                    idx = self._attack(
                        model, x, y, ranked[:, chunk[0]], idx, threat, restart > 0,
                        generator, x_adv, fooled, active_per_step,
                    )  # fmt: skip
                continue
            st = Stack.build(idx, ranked, chunk)
            xs, ys = x[st.rows], y[st.rows]
            rows_adv = xs.clone()
            rows_fooled = torch.zeros(len(xs), dtype=torch.bool, device=x.device)
            rows = torch.arange(len(xs), device=x.device)
            for restart in range(self.restarts):
                if not len(rows):
                    break
                rows = self._attack(
                    model, xs, ys, st.target, rows, threat, restart > 0, generator,
                    rows_adv, rows_fooled, active_per_step, st.group,
                )  # fmt: skip
                rows = st.robust_rows(rows, rows_fooled)
            idx = st.resolve(rows_adv, rows_fooled, x_adv, fooled)
        if fooled.any():
            # FAB lands just past the boundary, where logits can tie to the last bit and a
            # different batch may round the other way. Re-check every success once, on the
            # point as the base will return it; one that fails does not count.
            x_adv = get_norm(threat.norm).project(x_adv, x, threat.eps).clamp_(0.0, 1.0)
            with torch.no_grad():
                fooled &= model(x_adv).argmax(dim=1) != y
        return RunOutput(x_adv, fooled, active_per_step)

    def _attack(
        self,
        model,
        x,
        y,
        target,
        idx,
        threat,
        random_start,
        generator,
        x_adv,
        fooled,
        active,
        group=None,
    ) -> torch.Tensor:
        """One FAB run towards ``target`` on ``x[idx]``; returns the ``idx`` still robust.

        With ``group`` (stacked rows, see ``stacking``) a row that succeeds takes every
        row of its point out.
        """
        norm, eps = get_norm(threat.norm), threat.eps
        x0, y0, t0 = x[idx], y[idx], target[idx]
        g0 = torch.zeros_like(idx) if group is None else group[idx]
        xa = x0.clone()
        if random_start:
            xa = norm.random_start(x0, eps / 2, generator).clamp_(0.0, 1.0)
        # On a random surface (EOT) the first success inside the ball may be a lucky
        # draw, and FAB's points sit just past the boundary: there every example runs all
        # steps and keeps its inside-the-ball success with the largest margin.
        stop_early = getattr(model, "stop_early", True)
        best_margin = torch.full((len(idx),), -torch.inf, device=x.device)
        rows = torch.arange(len(idx), device=x.device)
        for _ in range(self.steps):
            margin, grad, _ = _margin_grad(model, xa, y0, t0)
            active.append(len(idx))
            xa, w = xa.flatten(1), grad.flatten(1)
            b = (w * xa).sum(dim=1) - margin
            # Project the current point and the clean point onto the linearised boundary.
            d = box_hyperplane_projection(
                torch.cat((xa, x0.flatten(1))), torch.cat((w, w)), torch.cat((b, b)), norm.name
            )
            d_cur, d_clean = d.chunk(2)
            dist_cur = _distance(norm.name, d_cur).clamp_min(1e-8)
            dist_clean = _distance(norm.name, d_clean).clamp_min(1e-8)
            # The further the current point is from the boundary relative to the clean
            # point, the more the step leans towards the clean point's projection.
            alpha = (dist_cur / (dist_cur + dist_clean)).clamp(0.0, self.alpha_max)[:, None]
            xa = (1 - alpha) * (xa + self.eta * d_cur) + alpha * (
                x0.flatten(1) + self.eta * d_clean
            )
            xa = xa.clamp(0.0, 1.0).view_as(x0)
            # A separate check: a too-far success steps back before the next gradient,
            # which happens at most steps on a robust point, so the gradient pass cannot
            # double as the check (measured: slower).
            with torch.no_grad():
                check = model(xa)
            wrong = check.argmax(dim=1) != y0
            dist = norm.distance(xa, x0)
            # Inside the ball: done. The check runs on exactly the point we return.
            done = wrong & (dist <= eps)
            if not stop_early:
                others = check.scatter(1, y0[:, None], -torch.inf).amax(dim=1)
                gain = done & (others - check[rows, y0] > best_margin)
                best_margin = torch.where(gain, others - check[rows, y0], best_margin)
                x_adv[idx[gain]] = xa[gain]
                fooled[idx[gain]] = True
            elif done.any():
                x_adv[idx[done]] = xa[done]
                fooled[idx[done]] = True
                keep = ~done if group is None else ~torch.isin(g0, g0[done])
                idx, x0, y0, t0, xa, wrong, g0 = (v[keep] for v in (idx, x0, y0, t0, xa, wrong, g0))
                rows = torch.arange(len(idx), device=x.device)
                if not len(idx):
                    break
            # Adversarial but too far: step back towards the clean input and go again.
            back = x0 + self.beta * (xa - x0)
            xa = torch.where(wrong.view(-1, *([1] * (x0.dim() - 1))), back, xa)
        if not stop_early:
            return idx[~fooled[idx]]
        return idx
