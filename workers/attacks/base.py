"""The attack contract: threat models, results, and the base class that owns them.

``Attack.__call__`` does everything every attack must get right (validation, eval mode,
batching, attacking only correctly classified points, keeping the result inside the
threat ball and [0, 1], the success mask); subclasses implement only ``run()`` on a
batch of points the model currently gets right.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.norms import NORMS, get_norm
from gauntlet.workers.hyperparams import (
    Hyper,
    expect_int,
    integer,
    reads_hyperparams,
    set_hyperparams,
    table_config,
)

# How far a subclass's x_adv may lie outside the ball or [0, 1] before the base calls it
# a bug rather than float rounding (the L2 projection is exact only up to a few ulps).
_CONTRACT_SLACK = 1e-4


@dataclass(frozen=True)
class Threat:
    """Where an adversary may move an input: the ``norm`` ball of radius ``eps``."""

    norm: str  # "linf" or "l2"
    eps: float


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # (n, C, H, W), in [0, 1], inside the threat ball of x
    clean_correct: torch.Tensor  # bool (n,): model correct on x
    robust: torch.Tensor  # bool (n,): still correct after the attack (False where clean wrong)
    grad_evals: int  # per-example forward+backward passes (sum over steps of active examples)
    # Active examples of every forward+backward pass, in order: what the cost was spent on
    # (benchmarks replay it as a lower bound; sum(active_per_step) == grad_evals).
    active_per_step: list[int] = field(default_factory=list)
    # Black-box attacks: model queries spent per example (0 where not attacked); None for
    # attacks that use gradients.
    queries: torch.Tensor | None = None


@dataclass
class RunOutput:
    """What ``Attack.run`` returns for one batch of correctly classified points."""

    x_adv: torch.Tensor
    fooled: torch.Tensor  # bool: the model misclassifies x_adv (checked by a forward pass)
    active_per_step: list[int] = field(default_factory=list)
    queries: torch.Tensor | None = None  # int64 (n,): black-box queries per example


def check_threat(threat: object) -> Threat:
    """``threat`` if it is a valid Threat, else GauntletError saying what to fix."""
    if not isinstance(threat, Threat):
        raise GauntletError(f"Expected a threat (norm and eps), but got {threat!r}")
    if threat.norm not in NORMS:
        known = ", ".join(repr(name) for name in NORMS)
        raise GauntletError(f"Expected `norm` to be one of {known}, but got {threat.norm!r}")
    problem = get_norm(threat.norm).check_eps(threat.eps)
    if problem is not None:
        raise GauntletError(f"Expected `eps` to be {problem}")
    return threat


def expect_norm(name: str, value: Any) -> str | None:
    if value is not None and value not in NORMS:
        known = ", ".join(repr(n) for n in NORMS)
        raise GauntletError(f"Expected `{name}` to be None or one of {known}, but got {value!r}")
    return value


# ``norm=None`` takes the norm from the threat; a fixed norm must match it (``check``).
NORM = Hyper(None, expect_norm)


def norm_and_steps(steps: int, **extra: Hyper) -> dict[str, Hyper]:
    """The table of an iterative gradient attack: its norm and step count, then its own
    ``extra`` hyperparameters."""
    return {"norm": NORM, "steps": integer(steps, 1, 10_000), **extra}


class Attack:
    """Base of all attacks. Hyperparameters are keyword arguments listed in ``hyperparams``."""

    name: ClassVar[str]
    hyperparams: ClassVar[Mapping[str, Hyper]] = {}
    # Every attack except "clean" needs a threat model; for those that don't, a given
    # threat is ignored.
    needs_threat: ClassVar[bool] = True
    # Score-based and decision-based attacks: they only query the model's outputs. A
    # black-box attack beating the white-box ones is a sign of gradient masking.
    black_box: ClassVar[bool] = False
    # Attacks fitted on training data first (universal perturbations): the evaluation
    # calls ``fit`` with the dataset's training split before ``__call__``.
    needs_train_data: ClassVar[bool] = False
    # Attacks outside any Lp ball (an adversarial patch): the result is only kept in
    # [0, 1]. Such attacks take no threat and do not count towards Lp leaderboards.
    unbounded: ClassVar[bool] = False
    # The code's version: bump it when a change alters the attack's numbers. Job keys
    # include it, so older results turn stale and ``gauntlet nightly`` re-runs them.
    # Read from the class: autoattack's hyperparameter ``version`` shadows it on instances.
    version: ClassVar[int] = 1

    @reads_hyperparams
    def __init__(self, **params: Any) -> None:
        set_hyperparams(self, params)
        self.prepare()

    def prepare(self) -> None:
        """Derived values and checks across hyperparameters, after each one's own check."""

    def fit(self, model, x, y, threat, generator) -> None:
        """Fit on training points (only for ``needs_train_data`` attacks): the arguments
        of ``run``, with the training split as ``x`` and ``y``."""

    def is_fitted(self) -> bool:
        """Whether ``fit`` has run (``needs_train_data`` attacks refuse to run before)."""
        return True

    def check_inputs(self, x: torch.Tensor, threat: Threat | None) -> None:
        """Checks of the images against fitted state (its shape, its threat); by default none."""

    def config(self) -> dict[str, Any]:
        """The hyperparameters, in declaration order: the source of ``repr``."""
        return table_config(self)

    def versions(self) -> dict[str, int]:
        """Name -> version of this attack and of every attack it runs: a composite keeps
        its member attacks in ``members`` (autoattack), and their code decides its numbers."""
        found = {self.name: type(self).version}
        for member in getattr(self, "members", ()):
            found.update(member.versions())
        return found

    def check(self, threat: Threat | None) -> None:
        """Attack-specific threat checks; GauntletError if unfit.

        By default: an attack configured for one norm (a ``norm`` attribute that is not
        None) refuses a threat in another.
        """
        norm = getattr(self, "norm", None)
        if threat is not None and norm is not None and threat.norm != norm:
            raise GauntletError(
                f"{self!r} attacks the {norm} norm, but the threat is {threat.norm}"
            )

    def run(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: Threat | None,
        generator: torch.Generator,
    ) -> RunOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({args})"

    def __call__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: Threat | None,
        *,
        batch_size: int = 256,
        generator: torch.Generator | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> AttackResult:
        threat = self._check_call(x, y, threat, batch_size)
        if generator is None:
            # Reproducible by default: the same submission gives the same number.
            generator = torch.Generator().manual_seed(0)
        was_training = model.training
        model.eval()
        try:
            return self._attack_batches(model, x, y, threat, batch_size, generator, progress)
        finally:
            model.train(was_training)

    def _check_call(
        self, x: torch.Tensor, y: torch.Tensor, threat: Threat | None, batch_size: int
    ) -> Threat | None:
        if self.needs_threat:
            if threat is None:
                raise GauntletError(f"The {self.name!r} attack needs a threat (norm and eps)")
            check_threat(threat)
        else:
            threat = None
        self.check(threat)
        expect_int("batch_size", batch_size, 1)
        if x.dim() != 4 or not x.is_floating_point():
            raise GauntletError(
                "Expected images as a float (n, C, H, W) tensor, "
                f"but got {x.dtype} of shape {tuple(x.shape)}"
            )
        if y.shape != (x.shape[0],):
            raise GauntletError(
                f"Expected labels of shape ({x.shape[0]},), but got {tuple(y.shape)}"
            )
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise GauntletError("Expected images in [0, 1]; normalisation belongs inside the model")
        if self.needs_train_data and not self.is_fitted():
            raise GauntletError(f"{self!r} must be fitted on training data before it is run")
        self.check_inputs(x, threat)
        return threat

    def _attack_batches(self, model, x, y, threat, batch_size, generator, progress) -> AttackResult:
        n = x.shape[0]
        x_adv = x.detach().clone()
        clean_correct = torch.zeros(n, dtype=torch.bool, device=x.device)
        robust = torch.zeros(n, dtype=torch.bool, device=x.device)
        queries = torch.zeros(n, dtype=torch.int64, device=x.device) if self.black_box else None
        active_per_step: list[int] = []
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size].detach(), y[start : start + batch_size]
            with torch.no_grad():
                correct = model(xb).argmax(dim=1) == yb
            clean_correct[start : start + len(xb)] = correct
            # Only points the model gets right are attacked: the others are lost already.
            idx = correct.nonzero().squeeze(1) + start
            if len(idx):
                out = self.run(model, x[idx].detach(), y[idx], threat, generator)
                x_adv[idx] = self._enforce_threat(out.x_adv.detach(), x[idx], threat)
                robust[idx] = ~out.fooled
                active_per_step.extend(out.active_per_step)
                if out.queries is not None:
                    # Ensembles with a black-box member report queries too.
                    if queries is None:
                        queries = torch.zeros(n, dtype=torch.int64, device=x.device)
                    queries[idx] = out.queries.to(queries.device, torch.int64)
            if progress is not None:
                progress(min(start + batch_size, n), n)
        return AttackResult(
            x_adv, clean_correct, robust, sum(active_per_step), active_per_step, queries
        )

    def _enforce_threat(self, x_adv: torch.Tensor, x: torch.Tensor, threat: Threat | None):
        """Project ``x_adv`` into the ball and [0, 1]; an attack that strays far is a bug."""
        if self.unbounded:
            allowed = x_adv.clamp(0.0, 1.0)
        elif threat is None:
            allowed = x
        else:
            allowed = get_norm(threat.norm).project(x_adv, x, threat.eps).clamp(0.0, 1.0)
        if (allowed - x_adv).abs().max() > _CONTRACT_SLACK:
            raise RuntimeError(f"{self!r} returned points outside the threat {threat}")
        return allowed


def judged_in_ball(model, found: torch.Tensor, x: torch.Tensor, y: torch.Tensor, norm, eps):
    """(points, fooled): ``found`` scaled back onto the ``eps`` ball of ``norm`` and into
    the box; projecting often lands short of the boundary, so the model decides."""
    from gauntlet.workers.attacks.norms import get_norm

    x_out = get_norm(norm).project(found, x, eps).clamp_(0.0, 1.0)
    with torch.no_grad():
        fooled = model(x_out).argmax(dim=1) != y
    return x_out, fooled
