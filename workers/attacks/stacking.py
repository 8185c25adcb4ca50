"""Several target classes in one batch, for the targeted attacks (APGD-T, FAB-T).

Run one target at a time, a targeted attack on a few points spends its time on per-step
overhead, not on arithmetic: on a CPU, 9 targets x 100 steps on 40 points costs about
nine times one target's run. Stacking puts the rows (point, target) for several targets
into one batch, target-major, capped at ``stack_rows`` rows per pass so that a large
batch (a GPU's) still runs one target at a time. A row that fools the model takes every
row of its point out (the attack's loop does it, given ``group``); a point fooled by
several targets at once keeps the row of the most likely one, the target a sequential
run would have tried first. Which points end up fooled does not depend on the order:
a point is fooled when some target's run fools it, in either schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def chunk_size(points: int, targets_left: int, stack_rows: int) -> int:
    """How many targets to stack for ``points`` points: at least 1, within the cap."""
    return max(1, min(targets_left, stack_rows // max(points, 1)))


@dataclass
class Stack:
    """Rows for points ``idx`` x targets ``ranks`` (target-major)."""

    idx: torch.Tensor  # the points, positions in the run's batch
    rows: torch.Tensor  # (k * m,) the point of each row, positions in the run's batch
    group: torch.Tensor  # (k * m,) the point of each row, 0..m-1
    target: torch.Tensor  # (k * m,) each row's target class
    k: int

    @classmethod
    def build(cls, idx: torch.Tensor, ranked: torch.Tensor, ranks: list[int]) -> Stack:
        k, m = len(ranks), len(idx)
        target = ranked[idx][:, ranks].T.reshape(-1)
        group = torch.arange(m, device=idx.device).repeat(k)
        return cls(idx=idx, rows=idx.repeat(k), group=group, target=target, k=k)

    def robust_rows(self, rows: torch.Tensor, fooled_rows: torch.Tensor) -> torch.Tensor:
        """``rows`` less every row of a point that some row has fooled."""
        return rows[~torch.isin(self.group[rows], self.group[fooled_rows.nonzero().squeeze(1)])]

    def resolve(self, x_adv_rows, fooled_rows, x_adv, fooled) -> torch.Tensor:
        """Write each point's row back into the run's outputs; return the points still robust.

        A fooled point takes its first fooling row (the lowest rank); a robust one takes
        its last target's row, as the last run of a sequential schedule would leave it.
        """
        m = len(self.idx)
        hit_rows = fooled_rows.view(self.k, m)
        hit = hit_rows.any(dim=0)
        first = hit_rows.int().argmax(dim=0)  # argmax returns the first maximum
        pick = torch.where(hit, first, self.k - 1) * m + torch.arange(m, device=hit.device)
        x_adv[self.idx] = x_adv_rows[pick]
        fooled[self.idx[hit]] = True
        return self.idx[~hit]
