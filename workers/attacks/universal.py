"""Universal adversarial perturbations (Moosavi-Dezfooli et al. 2017): one delta for all.

``fit`` learns a single perturbation from training points; the evaluation then adds it
to every test point, unchanged, so the number measures an input-agnostic weakness of
the model, not a per-example search. We use the stochastic-gradient form of the search
(as in universal adversarial training, Shafahi et al. 2020): ascend the mean loss over
minibatches of training points with respect to the one delta, projecting onto the ball
after every step. It needs no inner per-example attack and batches well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import (
    Attack,
    RunOutput,
    Threat,
    check_threat,
)
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.attacks.square import margin
from gauntlet.workers.hyperparams import integer, real

# Minibatch of training points per step: small enough for many steps per epoch on a
# few hundred points, large enough for the mean gradient to generalise.
_FIT_BATCH = 32
# The loss saturates at this margin: a point fooled by that much already adds no
# gradient, so the steps serve the points still classified correctly (the role of the
# original algorithm's "only points not yet fooled"), while a small cushion helps the
# perturbation carry over to unseen points.
_KAPPA = 2.0
# Points per forward pass when only predictions are needed.
_SCAN = 1024


def fit_points_subset(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, count: int, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` random training points the model classifies correctly.

    Points the model gets wrong are fooled with or without a perturbation: fitting on
    them would only dilute the gradient. Scans a random order in chunks and stops once
    it has enough, so a large training split costs little more than ``count`` forwards.
    """
    order = torch.randperm(len(x), generator=generator, device=generator.device).to(x.device)
    chosen: list[torch.Tensor] = []
    found = 0
    with torch.no_grad():
        for start in range(0, len(x), _SCAN):
            part = order[start : start + _SCAN]
            part = part[model(x[part]).argmax(dim=1) == y[part]][: count - found]
            chosen.append(part)
            found += len(part)
            if found == count:
                break
    picked = torch.cat(chosen)
    if not len(picked):
        raise GauntletError("The model gets every training point wrong: nothing to fit")
    return x[picked].detach(), y[picked]


def ascend_epochs(
    xs: torch.Tensor,
    ys: torch.Tensor,
    start: torch.Tensor,
    *,
    epochs: int,
    generator,
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    count_fooled: Callable[[torch.Tensor], int],
) -> torch.Tensor:
    """Fit one input-agnostic tensor: minibatch ascent of the hinged margin loss.

    Each epoch visits ``xs`` in a fresh random order, in minibatches of ``_FIT_BATCH``:
    ``logits(x_batch, param)`` is the model on the perturbed batch (it may draw from
    ``generator``), ``step(param, grad)`` the updated, projected ``param``. Returns the
    ``param`` that fooled the most points, by ``count_fooled``, at the end of an epoch.
    """
    param = start
    best, best_fooled = param.clone(), -1
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator, device=generator.device)
        order = order.to(xs.device)
        for begin in range(0, len(xs), _FIT_BATCH):
            batch = order[begin : begin + _FIT_BATCH]
            param = param.detach().requires_grad_(True)
            loss = (-margin(logits(xs[batch], param), ys[batch])).clamp(max=_KAPPA).mean()
            (grad,) = torch.autograd.grad(loss, param)
            param = step(param.detach(), grad)
        fooled = count_fooled(param)
        if fooled > best_fooled:
            best, best_fooled = param.detach().clone(), fooled
    return best


@register_attack
class Universal(Attack):
    """One perturbation, fitted on ``fit_points`` training points for ``epochs`` epochs.

    Each step moves delta by ``rel_stepsize * eps`` along the sign (Linf) or the
    normalised gradient (L2) of the mean hinged margin loss on a minibatch. The delta kept
    is the one fooling the most fitting points at the end of an epoch. ``run`` only adds
    it: one forward per point, no queries of the evaluated points before that.
    """

    name = "universal"
    needs_train_data = True

    hyperparams = {
        "fit_points": integer(500, 1, 1_000_000),
        "epochs": integer(10, 1, 10_000),
        "rel_stepsize": real(0.05, 0.0, 10.0),
    }

    def prepare(self) -> None:
        # The fitted perturbation (1, C, H, W) and the threat it was fitted for.
        self.delta: torch.Tensor | None = None
        self.fitted_threat: Threat | None = None

    def fit(self, model, x, y, threat, generator) -> None:
        if threat is None:
            raise GauntletError(f"The {self.name!r} attack needs a threat (norm and eps)")
        check_threat(threat)
        norm, eps = get_norm(threat.norm), threat.eps
        was_training = model.training
        model.eval()
        try:
            xs, ys = fit_points_subset(model, x, y, self.fit_points, generator)
            best = ascend_epochs(
                xs,
                ys,
                torch.zeros_like(xs[:1]),
                epochs=self.epochs,
                generator=generator,
                logits=lambda xb, delta: model((xb + delta).clamp(0.0, 1.0)),
                step=lambda delta, grad: norm.project(
                    delta + self.rel_stepsize * eps * norm.normalise(grad),
                    torch.zeros_like(delta),
                    eps,
                ),
                count_fooled=lambda delta: int((~self._correct(model, xs, ys, delta)).sum()),
            )
        finally:
            model.train(was_training)
        self.delta, self.fitted_threat = best, threat

    @staticmethod
    @torch.no_grad()
    def _correct(model, x, y, delta) -> torch.Tensor:
        parts = [
            model((x[i : i + _SCAN] + delta).clamp(0.0, 1.0)).argmax(dim=1) == y[i : i + _SCAN]
            for i in range(0, len(x), _SCAN)
        ]
        return torch.cat(parts)

    def is_fitted(self) -> bool:
        return self.delta is not None

    def check_inputs(self, x, threat) -> None:
        assert self.delta is not None  # the base checked is_fitted first
        if threat != self.fitted_threat:
            raise GauntletError(
                f"{self!r} was fitted for {self.fitted_threat}, but the threat is {threat}"
            )
        if tuple(self.delta.shape[1:]) != tuple(x.shape[1:]):
            raise GauntletError(
                f"{self!r} was fitted on images of shape {tuple(self.delta.shape[1:])}, "
                f"but got {tuple(x.shape[1:])}"
            )

    @torch.no_grad()
    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert self.delta is not None  # the base checked is_fitted
        # Clipping to [0, 1] moves each pixel towards x, so the result stays in the ball.
        x_adv = (x + self.delta.to(x.device, x.dtype)).clamp(0.0, 1.0)
        fooled = model(x_adv).argmax(dim=1) != y
        return RunOutput(x_adv, fooled)
