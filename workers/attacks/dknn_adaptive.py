"""The adaptive attack on Deep k-NN: move the features, not the logits (Sitawarin & Wagner
2019, "On the Robustness of Deep K-Nearest Neighbors").

A DkNN answers from the neighbours of an input's features in several layers and rejects
inputs whose layers disagree. An attack on the network's logits crosses the softmax
boundary while the early layers still look like the true class, so the DkNN rejects the
result: a rejection the attack never tried to avoid. This attack aims at an *accepted*
wrong answer instead. For each point it picks a target class (the wrong class with the
most neighbours), takes the ``guides`` training points of that class nearest to it in
the penultimate layer, and runs PGD on the sum over layers of the squared distance from
the input's features to the mean of the guides' features (each layer divided by its
starting distance, so wide layers do not drown the narrow ones). Every ``check_every``
steps it asks the real DkNN; a point counts as broken only once the DkNN gives it a wrong
label with credibility at or above the defense's threshold.

Adaptive evaluations of a rejecting defense (``against_rejection``) run the configured
attack first, on the bare network as before, and this attack on the points the plain one
left defended: the per-point worst case of the two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import Attack, AttackResult, RunOutput, norm_and_steps
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.registry import register_attack
from gauntlet.workers.hyperparams import integer, optional, real

if TYPE_CHECKING:  # importing the defenses here would import this package again
    from gauntlet.workers.defenses.dknn_index import DeepKNN

# Recorded in a job's ``adaptations``: the leaderboard credits a rejected adversarial
# input as defended only in results that carry it.
ADAPTATION = "dknn-feature-space"


def _dknn(model) -> tuple[DeepKNN, float]:
    """The fitted index and threshold of the DkNN defense ``model``, or GauntletError."""
    from gauntlet.workers.defenses.dknn_index import DeepKNN

    knn = getattr(model, "knn", None)
    if not isinstance(knn, DeepKNN) or not getattr(model, "rejects", False):
        raise GauntletError(
            f"dknn-feature-space attacks a fitted `dknn` defense, not {type(model).__name__}"
        )
    return knn, float(model.threshold)


def accepted_wrong(knn: DeepKNN, threshold: float, x: torch.Tensor, y: torch.Tensor):
    """bool (n,): the DkNN answers a wrong label and does not reject it."""
    pred, credibility, _, _ = knn.predict(x.detach())
    return ((pred.to(y.device) != y) & (credibility.to(y.device) >= threshold)).to(x.device)


@register_attack
class DkNNFeatureSpace(Attack):
    """Feature-space PGD towards the guides of one target class; ``plain``, when set, is an
    attack run first on the same points (the worst case of the two is returned)."""

    name = "dknn-feature-space"

    hyperparams = norm_and_steps(
        100,
        rel_stepsize=optional(real(None, 0.0, 10.0)),
        guides=integer(75, 1, 10_000),
        check_every=integer(10, 1, 10_000),
    )

    def prepare(self) -> None:
        if self.rel_stepsize is None:
            self.rel_stepsize = 2.5 / self.steps  # PGD's rule: a path of 2.5 eps
        self.plain: Attack | None = None
        self.breakdown: dict[str, int] = {}

    def check(self, threat) -> None:
        super().check(threat)
        if self.plain is not None:
            self.plain.check(threat)

    def __repr__(self) -> str:
        own = super().__repr__()
        return own if self.plain is None else f"{self.plain!r} + {own}"

    def _attack_batches(self, model, x, y, threat, batch_size, generator, progress):
        # Points are attacked when the *DkNN* answers them correctly; the base class would
        # use the bare network's answer, and skip points only the DkNN gets right.
        knn, threshold = _dknn(model)
        was_training = model.training
        model.eval()
        x_adv, active = x.detach().clone(), []
        clean = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        robust = torch.zeros_like(clean)
        for start in range(0, len(x), batch_size):
            sl = slice(start, start + batch_size)
            pred, cred, _, _ = knn.predict(x[sl])
            correct = (pred.to(y.device) == y[sl]) & (cred.to(y.device) >= threshold)
            clean[sl] = correct.to(x.device)
            idx = correct.to(x.device).nonzero().squeeze(1) + start
            if len(idx):
                out = self.run(model, x[idx].detach(), y[idx], threat, generator)
                x_adv[idx] = self._enforce_threat(out.x_adv.detach(), x[idx], threat)
                robust[idx] = ~out.fooled
                active.extend(out.active_per_step)
            if progress is not None:
                progress(min(start + batch_size, len(x)), len(x))
        model.train(was_training)
        return AttackResult(x_adv, clean, robust, sum(active), active)

    def run(self, model, x, y, threat, generator) -> RunOutput:
        knn, threshold = _dknn(model)
        x_adv, active = x.clone(), []
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        if self.plain is not None:
            out = self.plain.run(model, x, y, threat, generator)
            x_adv = self.plain._enforce_threat(out.x_adv.detach(), x, threat)
            fooled = accepted_wrong(knn, threshold, x_adv, y)
            active.extend(out.active_per_step)
            self._count(self.plain.name, fooled)
        idx = (~fooled).nonzero().squeeze(1)
        if len(idx):
            xa, broken, steps = self._feature_pgd(knn, threshold, x[idx], y[idx], threat, generator)
            # Only a success replaces the plain attack's point: both are inside the ball.
            x_adv[idx[broken]] = xa[broken]
            fooled[idx[broken]] = True
            active.extend(steps)
            self._count(self.name, broken)
        return RunOutput(x_adv, fooled, active)

    def _count(self, member: str, broken: torch.Tensor) -> None:
        self.breakdown[member] = self.breakdown.get(member, 0) + int(broken.sum())

    def _guide_means(self, knn: DeepKNN, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, (n, d): the mean features of each point's guides, on x's device."""
        counts = knn.neighbour_counts(x.detach())
        counts[torch.arange(len(y)), y.cpu()] = -1  # the target is a wrong class
        target = counts.argmax(1)
        last = knn.features(x.detach())[-1]
        dist = torch.cdist(last, knn.train_features[-1])
        # Training points of another class are pushed out of reach of topk.
        dist[knn.train_labels[None, :] != target[:, None]] = float("inf")
        m = min(self.guides, int((knn.train_labels == target[:, None]).sum(1).min()))
        if m < 1:
            raise GauntletError("dknn-feature-space found no training point of a target class")
        guides = dist.topk(m, dim=1, largest=False).indices
        return [f[guides].mean(1).to(x.device) for f in knn.train_features]

    def _feature_pgd(self, knn, threshold, x, y, threat, generator):
        """(x_adv, broken, active_per_step) of the feature-space PGD on points ``x``."""
        norm, eps = get_norm(threat.norm), threat.eps
        step_size = self.rel_stepsize * eps
        targets = self._guide_means(knn, x, y)
        with torch.no_grad():
            start = knn.differentiable_features(x)
        scales = [
            (f - t).pow(2).sum(1).clamp_min(1e-12) for f, t in zip(start, targets, strict=True)
        ]
        x_adv = x.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        idx = torch.arange(len(x), device=x.device)
        xa = norm.random_start(x, eps, generator).clamp_(0.0, 1.0)
        ball = norm.constraint(x, eps)
        active: list[int] = []
        for step in range(1, self.steps + 1):
            xa = xa.detach().requires_grad_(True)
            feats = knn.differentiable_features(xa)
            loss = sum(
                ((f - t[idx]).pow(2).sum(1) / s[idx]).sum()
                for f, t, s in zip(feats, targets, scales, strict=True)
            )
            (grad,) = torch.autograd.grad(loss, xa)
            active.append(len(idx))
            # Descent: towards the guides.
            xa = norm.project_clip(
                xa.detach().sub_(norm.normalise(grad), alpha=step_size), ball, eps
            )
            if step % self.check_every and step != self.steps:
                continue
            # The real decision, not the loss, says whether a point is broken.
            hit = accepted_wrong(knn, threshold, xa, y[idx])
            if hit.any():
                x_adv[idx[hit]] = xa[hit]
                broken[idx[hit]] = True
                keep = ~hit
                idx, xa, ball = idx[keep], xa[keep], ball[keep]
                if not len(idx):
                    break
        x_adv[idx] = xa.detach()
        return x_adv, broken, active


def against_rejection(attack: Attack, defended, adaptations: list[str], *, adaptive: bool):
    """(attack to run, adaptations) for an evaluation of ``defended``.

    An adaptive evaluation of a rejecting defense runs ``attack`` and then the
    feature-space attack on the points it left defended; a non-adaptive one, a clean run,
    an attack without an Lp budget and a black-box one stay as they are.
    """
    if isinstance(attack, DkNNFeatureSpace):
        return attack, [*adaptations, ADAPTATION]
    plain = not (adaptive and getattr(defended, "rejects", False))
    if plain or not attack.needs_threat or attack.unbounded or attack.black_box:
        return attack, adaptations
    if attack.needs_train_data:
        return attack, adaptations
    combined = DkNNFeatureSpace()
    # ``members``: the versions of what ran are read from there, as for autoattack.
    combined.plain, combined.members = attack, [attack]
    return combined, [*adaptations, ADAPTATION]
