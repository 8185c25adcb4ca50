"""Adversarial patch (Brown et al. 2017): one square of free pixels, pasted anywhere.

The patch is not bound to an Lp ball: inside its square any pixel value in [0, 1] is
allowed, outside nothing changes. It is fitted on training points, as in the paper,
not on the points it is evaluated on: a patch is meant as an input-agnostic (printable)
object, and fitting it on the test points would both overstate it and make the number
depend on how the test set is batched. Placement is the transformation sampled for
Expectation over Transformation (Athalye et al. 2018): every step pastes the patch at
fresh random places, so it must work wherever it lands; evaluation pastes it once per
example at a seeded random place.
"""

from __future__ import annotations

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.attacks.square import put_windows, random_windows
from gauntlet.workers.attacks.universal import ascend_epochs, fit_points_subset
from gauntlet.workers.hyperparams import integer, real


def patch_side(size: float, height: int, width: int) -> int:
    """The patch's side in pixels: ``size`` times the shorter image side, at least 1."""
    return max(1, min(height, width, round(size * min(height, width))))


def paste(x: torch.Tensor, patch: torch.Tensor, top: torch.Tensor, left: torch.Tensor):
    """``x`` with ``patch`` (C, s, s) pasted at per-example corners; differentiable in patch."""
    values = patch.unsqueeze(0).expand(len(x), *patch.shape)
    return put_windows(x.clone(), top, left, values)


@register_attack
class Patch(Attack):
    """A square patch of side ``size`` (fraction of the image side) fitted with EOT.

    ``fit`` ascends the mean hinged margin loss over minibatches of ``fit_points``
    training points for ``epochs`` epochs, each point with a random placement, by signed
    steps of ``step_size`` in pixel values. The patch kept is the one fooling the most
    fitting points under one fixed set of random placements, checked after each epoch.
    Takes no threat (one given is ignored): the result is only kept in [0, 1].
    """

    name = "patch"
    needs_threat = False
    needs_train_data = True
    unbounded = True

    hyperparams = {
        "size": real(0.25, 0.0, 1.0),
        "fit_points": integer(500, 1, 1_000_000),
        "epochs": integer(10, 1, 10_000),
        "step_size": real(0.05, 0.0, 1.0),
    }

    def prepare(self) -> None:
        # The fitted patch, (C, s, s) in [0, 1].
        self.patch: torch.Tensor | None = None

    def fit(self, model, x, y, threat, generator) -> None:
        _, c, h, w = x.shape
        s = patch_side(self.size, h, w)
        was_training = model.training
        model.eval()
        try:
            xs, ys = fit_points_subset(model, x, y, self.fit_points, generator)
            # Start from noise, not grey: a constant patch has a symmetric start that
            # signed steps leave only slowly.
            shape = (c, s, s)
            patch = torch.rand(shape, generator=generator, device=generator.device)
            patch = patch.to(xs.device, xs.dtype)
            # One fixed set of placements to compare epochs by, so the choice of the
            # best patch is not decided by placement luck.
            check = random_windows(len(xs), h, w, s, generator, xs.device)

            def logits(xb, patch):
                # Each point of each step gets a fresh placement: EOT over placements.
                top, left = random_windows(len(xb), h, w, s, generator, xs.device)
                return model(paste(xb, patch, top, left))

            # Fitted as a universal perturbation is: hinged on the margin, so points fooled
            # by that much stop pulling the patch and the steps serve those not fooled yet.
            best = ascend_epochs(
                xs,
                ys,
                patch,
                epochs=self.epochs,
                generator=generator,
                logits=logits,
                step=lambda patch, grad: (patch + self.step_size * grad.sign()).clamp(0.0, 1.0),
                count_fooled=lambda patch: int(
                    (~self._correct(model, xs, ys, patch, *check)).sum()
                ),
            )
        finally:
            model.train(was_training)
        self.patch = best

    @staticmethod
    @torch.no_grad()
    def _correct(model, x, y, patch, top, left) -> torch.Tensor:
        parts = []
        for i in range(0, len(x), 1024):
            pasted = paste(x[i : i + 1024], patch, top[i : i + 1024], left[i : i + 1024])
            parts.append(model(pasted).argmax(dim=1) == y[i : i + 1024])
        return torch.cat(parts)

    def is_fitted(self) -> bool:
        return self.patch is not None

    def check_inputs(self, x, threat) -> None:
        assert self.patch is not None  # the base checked is_fitted first
        c, s = self.patch.shape[0], self.patch.shape[-1]
        if x.shape[1] != c or min(x.shape[2:]) < s:
            raise GauntletError(
                f"{self!r} holds a {c}-channel patch of side {s}, "
                f"which does not fit images of shape {tuple(x.shape[1:])}"
            )

    @torch.no_grad()
    def run(self, model, x, y, threat, generator) -> RunOutput:
        assert self.patch is not None  # the base checked is_fitted
        patch = self.patch.to(x.device, x.dtype)
        _, _, h, w = x.shape
        top, left = random_windows(len(x), h, w, patch.shape[-1], generator, x.device)
        x_adv = paste(x, patch, top, left)
        fooled = model(x_adv).argmax(dim=1) != y
        return RunOutput(x_adv, fooled)
