"""Auto-PGD (Croce & Hein 2020): APGD-CE, APGD-DLR and targeted APGD-T.

APGD is PGD with momentum and a step size that tunes itself: it starts at 2 * eps and
halves at checkpoints when progress stalls, each time restarting from the best point so
far. It has no step size to get wrong, which is what makes it fit for a benchmark.

As in PGD, an example leaves the active batch at the forward pass that shows it
misclassified, keeping that point; restarts and target classes run only on points that
are still robust. On a randomized surface (``stop_early = False``, EOT) every example
runs the whole budget and keeps its highest-loss point, as AutoAttack's ``rand`` needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import Attack, RunOutput, norm_and_steps
from gauntlet.workers.attacks.losses import cross_entropy, dlr, targeted_dlr
from gauntlet.workers.attacks.norms import Norm, get_norm
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.attacks.stacking import Stack, chunk_size
from gauntlet.workers.hyperparams import integer, real

# Weight of the new gradient step against the previous step (alpha in the paper).
MOMENTUM = 0.75

# loss(logits, y, target) -> (n,); untargeted losses ignore the target.
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# on_step(steps_done, idx, step_size): lets tests watch the step-size schedule.
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


def checkpoint_hundredths() -> list[int]:
    """The checkpoints p_1, p_2, ... in hundredths.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), while <= 1.

    Integers, because in floats 0.22 * 100 is 22.000000000000004, whose ceiling is 23.
    """
    points = [0, 22]
    while (step := max(points[-1] - points[-2] - 3, 6)) + points[-1] <= 100:
        points.append(points[-1] + step)
    return points[1:]


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j * steps) after which the step size may halve."""
    marks = {-(-p * steps // 100) for p in checkpoint_hundredths()}
    return sorted(m for m in marks if 0 < m <= steps)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example vector shaped to broadcast against a batch of images."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Active:
    """Everything kept per active example, compacted together when examples drop out."""

    idx: torch.Tensor  # positions in the run's batch
    y: torch.Tensor
    target: torch.Tensor | None
    ball: torch.Tensor  # the norm's constraint tensor
    x: torch.Tensor  # current iterate
    x_prev: torch.Tensor  # previous iterate, for the momentum term
    grad: torch.Tensor
    eta: torch.Tensor  # step size
    loss: torch.Tensor  # loss at the current iterate
    best_loss: torch.Tensor
    best_x: torch.Tensor
    best_grad: torch.Tensor
    best_at_check: torch.Tensor  # best_loss at the previous checkpoint
    halved_at_check: torch.Tensor  # bool: the step size halved at the previous checkpoint
    increases: torch.Tensor  # steps since the previous checkpoint that raised the loss
    group: torch.Tensor | None  # stacked targets: the point each row attacks

    def select(self, keep: torch.Tensor) -> _Active:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _Active(**{k: v if v is None else v[keep] for k, v in values.items()})


def _loss_grad(model, loss_fn: Loss, x, y, target):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, y, target)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad, logits.detach()


def apgd_restart(
    model: torch.nn.Module,
    loss_fn: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    norm: Norm,
    eps: float,
    *,
    steps: int,
    rho: float,
    generator: torch.Generator,
    x_adv: torch.Tensor,
    fooled: torch.Tensor,
    active_per_step: list[int],
    target: torch.Tensor | None = None,
    on_step: StepHook | None = None,
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """One APGD run from a random start on ``x[idx]``; returns the ``idx`` still robust.

    Fooled examples get their adversarial point in ``x_adv`` and True in ``fooled``;
    robust ones get their highest-loss point. On a model with ``stop_early = False`` (an
    EOT surface) no example leaves early: every one runs all steps, and the judgement
    is one forward pass on its highest-loss point. With ``group`` (rows of one point
    against several targets, see ``stacked_targets``) a row that fools the model takes
    every row of its point out of the batch: the point is done.
    """
    stop_early = getattr(model, "stop_early", True)
    x0 = x[idx]
    ball = norm.constraint(x0, eps)
    xa = norm.project_clip(norm.random_start(x0, eps, generator), ball, eps)
    t0 = None if target is None else target[idx]
    loss, grad, logits = _loss_grad(model, loss_fn, xa, y[idx], t0)
    active_per_step.append(len(idx))
    no = torch.zeros_like(loss, dtype=torch.bool)
    s = _Active(
        idx=idx, y=y[idx], target=t0, ball=ball, x=xa, x_prev=xa, grad=grad,
        eta=torch.full_like(loss, 2 * eps), loss=loss, best_loss=loss, best_x=xa,
        # "Halved" at the start, as in the official code: condition 2 first applies at
        # the second checkpoint, so a slow first window is judged by condition 1 alone.
        best_grad=grad, best_at_check=loss, halved_at_check=~no, increases=no.long(),
        group=None if group is None else group[idx],
    )  # fmt: skip
    marks, last_mark = set(checkpoints(steps)), 0
    for i in range(steps + 1):
        # The forward pass that computed this loss shows who is fooled already: they
        # leave with that point and are never computed again.
        wrong = logits.argmax(dim=1) != s.y
        # On a random surface a misclassifying pass may be a lucky draw (see PGD.run):
        # such examples stay and keep raising their loss.
        if stop_early and wrong.any():
            x_adv[s.idx[wrong]] = s.x[wrong]
            fooled[s.idx[wrong]] = True
            leave = wrong if s.group is None else torch.isin(s.group, s.group[wrong])
            s = s.select(~leave)
        if i == steps or not len(s.idx):
            break
        step = norm.normalise(s.grad) * _bc(s.eta, s.x)
        z = norm.project_clip(s.x + step, s.ball, eps)
        if i > 0:
            # Heavy-ball: mostly the new step, a quarter of the previous displacement.
            z = s.x + MOMENTUM * (z - s.x) + (1 - MOMENTUM) * (s.x - s.x_prev)
            z = norm.project_clip(z, s.ball, eps)
        s.x_prev, s.x = s.x, z
        loss, s.grad, logits = _loss_grad(model, loss_fn, s.x, s.y, s.target)
        active_per_step.append(len(s.idx))
        s.increases += loss > s.loss
        s.loss = loss
        better = loss > s.best_loss
        s.best_loss = torch.where(better, loss, s.best_loss)
        s.best_x = torch.where(_bc(better, s.x), s.x, s.best_x)
        s.best_grad = torch.where(_bc(better, s.x), s.grad, s.best_grad)
        if i + 1 in marks:
            window, last_mark = i + 1 - last_mark, i + 1
            # Condition 1: the loss rose in too few of the window's steps (oscillation).
            # "<=" as in the official code: a tie is not progress.
            oscillating = s.increases <= rho * window
            # Condition 2: the step did not shrink last time, and nothing improved since.
            stalled = ~s.halved_at_check & (s.best_loss <= s.best_at_check)
            halve = oscillating | stalled
            s.eta = torch.where(halve, s.eta / 2, s.eta)
            h = _bc(halve, s.x)
            # Restart from the best point. The previous iterate stays, so the next step's
            # momentum points from it to the best point, as in the official code.
            s.x = torch.where(h, s.best_x, s.x)
            s.grad = torch.where(h, s.best_grad, s.grad)
            s.halved_at_check, s.best_at_check = halve, s.best_loss
            s.increases = torch.zeros_like(s.increases)
        if on_step is not None:
            on_step(i + 1, s.idx, s.eta)
    x_adv[s.idx] = s.best_x
    if stop_early or not len(s.idx):
        return s.idx
    with torch.no_grad():
        wrong = model(s.best_x).argmax(dim=1) != s.y
    fooled[s.idx[wrong]] = True
    return s.idx[~wrong]


_LOSSES: dict[str, Loss] = {
    "ce": lambda logits, y, _t: cross_entropy(logits, y),
    "dlr": lambda logits, y, _t: dlr(logits, y),
    "targeted-dlr": lambda logits, y, t: targeted_dlr(logits, y, t),
}


class _APGDBase(Attack):
    """Shared parameters; ``norm=None`` takes the norm from the threat."""

    # 2: momentum across a restart and the first checkpoint as in the official code.
    version = 2

    # ``rho``: the fraction of a window's steps that must raise the loss to keep the step.
    hyperparams = norm_and_steps(100, restarts=integer(1, 1, 100), rho=real(0.75, 0.0, 1.0))

    def _restarts(self, model, loss_fn, x, y, idx, threat, generator, out, target=None, st=None):
        """Restarts on the points of ``idx`` still robust; returns those that stay so.

        With a ``Stack`` ``st``, ``x``, ``y``, ``target`` and ``out`` are its rows.
        """
        assert threat is not None  # the base checked it
        x_adv, fooled, active_per_step = out
        for _ in range(self.restarts):
            if not len(idx):
                break
            idx = apgd_restart(
                model, loss_fn, x, y, idx, get_norm(threat.norm), threat.eps,
                steps=self.steps, rho=self.rho, generator=generator, x_adv=x_adv,
                fooled=fooled, active_per_step=active_per_step, target=target,
                group=None if st is None else st.group,
            )  # fmt: skip
            if st is not None:
                idx = st.robust_rows(idx, fooled)
        return idx


class _UntargetedAPGD(_APGDBase):
    loss: str

    def run(self, model, x, y, threat, generator) -> RunOutput:
        out = (x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device), [])
        idx = torch.arange(len(x), device=x.device)
        self._restarts(model, _LOSSES[self.loss], x, y, idx, threat, generator, out)
        return RunOutput(*out)


@register_attack
class APGDCE(_UntargetedAPGD):
    """APGD on the cross-entropy loss."""

    name = "apgd-ce"
    loss = "ce"


@register_attack
class APGDDLR(_UntargetedAPGD):
    """APGD on the DLR loss: invariant to the logits' scale, so it sees through models
    whose cross-entropy saturates."""

    name = "apgd-dlr"
    loss = "dlr"


@register_attack
class APGDT(_APGDBase):
    """Targeted APGD on the targeted DLR loss, against each of the ``n_target_classes``
    most likely wrong classes in turn (on points still robust). With fewer classes than
    that, every wrong class is a target. ``stack_rows`` > 0 runs several targets in one
    batch of at most that many rows (see ``stacking``); 0 runs one target at a time.
    ``first_target`` > 1 skips the likeliest classes: ``autoattack-fast`` has attacked
    those already on the same points.
    """

    name = "apgd-t"

    hyperparams = {
        **_APGDBase.hyperparams,
        "n_target_classes": integer(9, 1, 1000),
        "stack_rows": integer(0, 0, 1_000_000),
        "first_target": integer(1, 1, 1000),
    }

    def prepare(self) -> None:
        if self.first_target > self.n_target_classes:
            raise GauntletError(
                f"Expected `first_target` at most `n_target_classes` "
                f"({self.n_target_classes}), but got {self.first_target}"
            )

    def run(self, model, x, y, threat, generator) -> RunOutput:
        out = (x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device), [])
        with torch.no_grad():
            ranked = model(x).argsort(dim=1, descending=True)
        if ranked.shape[1] < 4:
            raise GauntletError(f"{self.name} needs at least 4 classes, but got {ranked.shape[1]}")
        idx = torch.arange(len(x), device=x.device)
        loss_fn = _LOSSES["targeted-dlr"]
        # Rank 0 is the true class (run() only sees correctly classified points).
        last = min(self.n_target_classes, ranked.shape[1] - 1)
        ranks = list(range(self.first_target, last + 1))
        while ranks and len(idx):
            k = chunk_size(len(idx), len(ranks), self.stack_rows)
            chunk, ranks = ranks[:k], ranks[k:]
            if k == 1:
                target = ranked[:, chunk[0]]
                idx = self._restarts(model, loss_fn, x, y, idx, threat, generator, out, target)
                continue
            st = Stack.build(idx, ranked, chunk)
            xs, ys = x[st.rows], y[st.rows]
            rows_out = (xs.clone(), torch.zeros(len(xs), dtype=torch.bool, device=x.device))
            rows = torch.arange(len(xs), device=x.device)
            self._restarts(
                model, loss_fn, xs, ys, rows, threat, generator, (*rows_out, out[2]),
                st.target, st,
            )  # fmt: skip
            idx = st.resolve(*rows_out, out[0], out[1])
        return RunOutput(*out)
