"""Square Attack (Andriushchenko et al. 2020): score-based random search, AutoAttack's member.

Each query proposes one change of a random square window of the current best point and
keeps it if the loss (margin by default) goes down. Windows shrink over the budget by the
paper's schedule for ``p``, the fraction of pixels a window covers. Only model outputs
are used, so a Square number far below the gradient attacks' flags gradient masking.

Unlike the batched reference code, every example draws its own window and signs: an
example's search then does not depend on which other examples share its batch.
"""

from __future__ import annotations

import math

import torch

from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.hyperparams import integer, one_of, real

# (iteration bound on a 10,000-query scale, divisor of p_init): the paper's schedule.
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64))
_SCHEDULE += ((6000, 128), (8000, 256))
_LOSSES = ("margin", "ce")
# Guards divisions by a window's norm (an all-zero window must not give NaN).
_TINY = 1e-12
# Sign redraws before giving up on a proposal that would not change the point.
_REDRAWS = 8


def p_selection(p_init: float, it: int, budget: int) -> float:
    """``p`` at iteration ``it``: the schedule is defined for 10,000 queries and rescaled."""
    scaled = int(it / budget * 10_000)
    for bound, divisor in _SCHEDULE:
        if scaled <= bound:
            return p_init / divisor
    return p_init / 512


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i per example: negative exactly when the model is fooled."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(dim=1)


def _randint(high: int, n: int, generator: torch.Generator, device: torch.device):
    """n draws from [0, high), made on the generator's device so seeds match across devices."""
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def random_signs(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor):
    draw = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (2 * draw - 1).to(like.device, like.dtype)


def random_windows(n: int, h: int, w: int, s: int, generator: torch.Generator, device):
    """Top-left corners (rows, cols) of one s x s window per example; every corner possible."""
    return _randint(h - s + 1, n, generator, device), _randint(w - s + 1, n, generator, device)


def _window_index(top: torch.Tensor, left: torch.Tensor, s: int):
    offsets = torch.arange(s, device=top.device)
    rows = (top[:, None] + offsets)[:, :, None]  # (n, s, 1)
    cols = (left[:, None] + offsets)[:, None, :]  # (n, 1, s)
    batch = torch.arange(len(top), device=top.device)[:, None, None]
    return batch, rows, cols


def take_windows(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, s: int):
    """The (n, C, s, s) windows of ``t`` (n, C, H, W) at per-example corners."""
    batch, rows, cols = _window_index(top, left, s)
    # Advanced indices around the channel slice put their dims first: (n, s, s, C).
    return t[batch, :, rows, cols].permute(0, 3, 1, 2)


def put_windows(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, values: torch.Tensor):
    """Write ``values`` (n, C, s, s) into ``t`` in place at per-example corners."""
    batch, rows, cols = _window_index(top, left, values.shape[-1])
    t[batch, :, rows, cols] = values.permute(0, 2, 3, 1)
    return t


_BASES: dict[tuple, torch.Tensor] = {}  # (s, w, device) -> a window's flat offsets


def _flat_window_index(top, left, s: int, w: int, c: int) -> torch.Tensor:
    """(n, C, s*s) positions in flattened H*W of each example's s x s window."""
    key = (s, w, top.device)
    if key not in _BASES:
        offsets = torch.arange(s, device=top.device)
        _BASES[key] = (offsets[:, None] * w + offsets[None, :]).flatten()
    return (top * w + left)[:, None].add(_BASES[key])[:, None, :].expand(-1, c, -1)


def _window_mask(top, left, s: int, h: int, w: int) -> torch.Tensor:
    """Boolean (n, 1, H, W): where each example's window lies."""
    r = torch.arange(h, device=top.device)[None, :, None]
    c = torch.arange(w, device=top.device)[None, None, :]
    inside = (r >= top[:, None, None]) & (r < top[:, None, None] + s)
    inside = inside & (c >= left[:, None, None]) & (c < left[:, None, None] + s)
    return inside[:, None]


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _rectangles(a: int, b: int, device) -> torch.Tensor:
    """a x b concentric rectangles around the centre, weight 1/(k+1)^2 per ring k, summed."""
    rows = (torch.arange(a, device=device) - a // 2).abs()[:, None]
    cols = (torch.arange(b, device=device) - b // 2).abs()[None, :]
    ring = torch.maximum(rows, cols)
    rings = max(a // 2, b // 2) + 1
    weights = 1.0 / torch.arange(1, rings + 1, device=device, dtype=torch.float32) ** 2
    # A pixel in ring k lies inside every rectangle of half-width >= k.
    tails = weights.flip(0).cumsum(0).flip(0)
    out = tails[ring]
    return out / out.norm()


def pseudo_gaussian(s: int, device) -> torch.Tensor:
    """The L2 attack's s x s update pattern: + rectangles on top, - below, unit norm."""
    out = torch.cat((_rectangles(s // 2, s, device), -_rectangles(s - s // 2, s, device)))
    return out / out.norm()


@register_attack
class Square(Attack):
    """Square Attack with ``queries`` queries per example per restart (margin loss).

    Linf: stripes of +-eps to start; a window is set to x +- eps per channel. L2: a grid
    of pseudo-Gaussian bumps to start; a window's mass moves into a new bump, a second
    window is emptied, and the whole perturbation is rescaled to norm eps. Restarts rerun
    on points still robust, each with the full budget, as in AutoAttack; queries reported
    are the sum over restarts, counting the starting point's query.
    """

    name = "square"
    black_box = True
    # 2: the signs' redraws are drawn at once (same law, other draws).
    version = 2

    hyperparams = {
        "queries": integer(5000, 1, 1_000_000),
        "p_init": real(0.8, 0.0, 1.0),
        "restarts": integer(1, 1, 100),
        "loss": one_of("margin", _LOSSES),
    }

    def _query(self, model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, misclassified) from one forward pass."""
        logits = model(x)
        if self.loss == "margin":
            gap = margin(logits, y)
            # A negative margin is a misclassification (an exact tie, where argmax may
            # go either way, is not counted yet): one op less per query.
            return gap, gap < 0
        wrong = logits.argmax(dim=1) != y
        return -torch.nn.functional.cross_entropy(logits, y, reduction="none"), wrong

    @torch.no_grad()
    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert threat is not None  # the base checked it
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        queries = torch.zeros(len(x), dtype=torch.int64, device=x.device)
        idx = torch.arange(len(x), device=x.device)
        for _ in range(self.restarts):
            if not len(idx):
                break
            idx = self._search(model, x, y, idx, threat, generator, x_adv, fooled, queries)
        return RunOutput(x_adv, fooled, [], queries)

    def _search(self, model, x, y, idx, threat, generator, x_adv, fooled, queries):
        """One random search on the points ``idx``; fills the outputs, returns the unfooled."""
        linf, eps = threat.norm == "linf", threat.eps
        x0, y0 = x[idx], y[idx]
        n, c, h, w = x0.shape
        if linf:
            stripes = random_signs((n, c, 1, w), generator, x0)
            best = (x0 + eps * stripes).clamp(0.0, 1.0)
        else:
            best = (x0 + self._l2_start(x0, eps, generator)).clamp(0.0, 1.0)
        loss, wrong = self._query(model, best, y0)
        # Counted when an example leaves: at iteration ``it`` it has spent it + 1 queries
        # (the start and ``it`` proposals); no per-query indexed add.
        # On a random surface (EOT, ``stop_early = False``) a misclassifying query may be
        # a lucky draw: every example spends the whole budget lowering its loss, and is
        # judged by the query that found its best point.
        stop_early = getattr(model, "stop_early", True)
        for it in range(self.queries):
            if stop_early and wrong.any():
                done = wrong.nonzero().squeeze(1)
                x_adv[idx[done]] = best[done]
                fooled[idx[done]] = True
                queries[idx[done]] += it + 1
                keep = (~wrong).nonzero().squeeze(1)
                idx, x0, y0, best, loss = idx[keep], x0[keep], y0[keep], best[keep], loss[keep]
            # The starting point took one query: the budget allows queries - 1 proposals.
            if not len(idx) or it == self.queries - 1:
                break
            p = p_selection(self.p_init, it, self.queries)
            if linf:
                proposal = self._linf_proposal(x0, best, p, eps, generator)
            else:
                proposal = self._l2_proposal(x0, best, p, eps, generator)
            new_loss, new_wrong = self._query(model, proposal, y0)
            improved = new_loss < loss
            # A margin below zero is below every kept loss (those are >= 0): no OR needed.
            plain = self.loss == "margin" or not stop_early
            better = improved if plain else improved | new_wrong
            loss = torch.minimum(new_loss, loss)
            best = torch.where(better[:, None, None, None], proposal, best)
            wrong = new_wrong if stop_early else torch.where(better, new_wrong, wrong)
        x_adv[idx] = best
        queries[idx] += it + 1
        if not stop_early:
            fooled[idx[wrong]] = True
            idx = idx[~wrong]
        return idx

    def _linf_proposal(self, x0, best, p, eps, generator):
        n, c, h, w = x0.shape
        s = min(max(round(math.sqrt(p * h * w)), 1), h, w)
        top, left = random_windows(n, h, w, s, generator, x0.device)
        # The windows as flat (n, C, s*s) gathers: a handful of ops per query instead of
        # broadcast advanced indexing; on small images that overhead rivals the model's.
        index = _flat_window_index(top, left, s, w, c)
        clean = x0.flatten(2).gather(2, index)
        current = best.flatten(2).gather(2, index)
        # A proposal equal to the current window wastes a query (common where pixels sit
        # at 0 and x - eps clips back to x): redraw the signs of those, as the paper does.
        # All draws at once: each example takes its first draw that changes the window
        # (its last if none does), the law of redrawing one at a time, in a few ops
        # instead of a loop that runs until the last of the batch differs.
        signs = random_signs((_REDRAWS + 1, n, c, 1), generator, x0)
        windows = (clean + eps * signs).clamp_(0.0, 1.0)  # (draws, n, C, s*s)
        differs = ((windows - current).abs() >= 1e-7).flatten(2).any(dim=2)  # (draws, n)
        differs[-1] = True
        first = differs.int().argmax(dim=0)  # argmax returns the first maximum
        window = windows[first, torch.arange(n, device=x0.device)]
        return best.flatten(2).scatter(2, index, window).view_as(best)

    def _l2_start(self, x0, eps, generator) -> torch.Tensor:
        """A grid of pseudo-Gaussian bumps with random signs, scaled to norm eps."""
        n, c, h, w = x0.shape
        s = max(min(h, w) // 5, 1)
        delta = torch.zeros_like(x0)
        bump = pseudo_gaussian(s, x0.device).to(x0.dtype)
        # Whole squares only, the grid centred in the image.
        for top in range((h - s * (h // s)) // 2, h - s + 1, s):
            for left in range((w - s * (w // s)) // 2, w - s + 1, s):
                signs = random_signs((n, c, 1, 1), generator, x0)
                delta[:, :, top : top + s, left : left + s] = bump * signs
        return delta / _flat_norm(delta).clamp_min(_TINY) * eps

    def _l2_proposal(self, x0, best, p, eps, generator):
        n, c, h, w = x0.shape
        s = max(round(math.sqrt(p * h * w)), 3)
        s = min(s + 1 - s % 2, h, w)  # odd, so the bump has a centre pixel
        delta = best - x0
        top, left = random_windows(n, h, w, s, generator, x0.device)
        top2, left2 = random_windows(n, h, w, s, generator, x0.device)
        old = take_windows(delta, top, left, s)
        old_norms = old.flatten(2).norm(dim=2)[:, :, None, None]
        # The mass of both windows (per channel), plus the budget still unused, goes into
        # the new bump in window 1; window 2 is emptied.
        both = _window_mask(top, left, s, h, w) | _window_mask(top2, left2, s, h, w)
        mass = (delta * both).flatten(2).norm(dim=2)[:, :, None, None]
        unused = (eps**2 - _flat_norm(delta) ** 2).clamp_min(0.0) / c
        bump = pseudo_gaussian(s, x0.device).to(x0.dtype)
        # Each example's bump points up or down, and sideways half of the time.
        turn = torch.rand(n, generator=generator, device=generator.device).to(x0.device) < 0.5
        bump = torch.where(turn[:, None, None, None], bump.T, bump)
        new = bump * random_signs((n, c, 1, 1), generator, x0) + old / (old_norms + _TINY)
        new = new / new.flatten(2).norm(dim=2)[:, :, None, None].clamp_min(_TINY)
        new = new * (unused + mass**2).sqrt()
        delta = put_windows(
            delta.masked_fill(_window_mask(top2, left2, s, h, w), 0.0), top, left, new
        )
        return (x0 + delta / _flat_norm(delta).clamp_min(_TINY) * eps).clamp(0.0, 1.0)
