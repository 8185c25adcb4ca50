"""The defense contract: a module that wraps a classifier and says how to attack it.

A defense declares two facts the robustness track needs to evaluate it honestly:

- ``differentiable``: whether gradients through its transform mean anything. For one
  that is not (JPEG, bit-depth reduction, quilting) plain gradients are zero or
  useless, and adaptive attacks use BPDA: the transform in the forward pass, the
  identity in the backward pass (Athalye et al. 2018).
- ``randomized``: whether two forward passes on one input can differ. Adaptive attacks
  then use EOT: the gradient of the expectation over the randomness.

``forward`` is the defended model as deployed. For a non-differentiable transform it
passes no gradient at all (what autograd would give for a piecewise-constant op), so a
non-adaptive attack sees exactly the masked gradients a naive evaluation would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gauntlet.workers.hyperparams import Hyper, reads_hyperparams, set_hyperparams, table_config
from gauntlet.workers.registry import Registry, configure

DEFENSES: Registry[type[Defense]] = Registry("defense")


class Defense(torch.nn.Module):
    name: ClassVar[str]
    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False
    # Built from training data (quilting's patch database, DkNN's index): the evaluation
    # fits the defense once, keeps the fitted state as an artifact and loads it in later
    # jobs (see ``workers.defenses.state``). ``fit_uses_model``: the state depends on the
    # weights too, not only on the data.
    needs_fit: ClassVar[bool] = False
    fit_uses_model: ClassVar[bool] = False
    # May refuse to answer (DkNN's low credibility): ``decide`` says which inputs it
    # accepts, and a rejected adversarial input counts as a defended one.
    rejects: ClassVar[bool] = False
    # The code's version: bump it when a change alters the defended model's numbers; job
    # keys include it, so older results turn stale and ``gauntlet nightly`` re-runs them.
    version: ClassVar[int] = 1

    hyperparams: ClassVar[Mapping[str, Hyper]] = {}

    @reads_hyperparams
    def __init__(self, model: torch.nn.Module | None = None, **params: Any):
        super().__init__()
        self.model = model
        set_hyperparams(self, params)
        self.prepare()

    def prepare(self) -> None:
        """Derived values and state, after each hyperparameter's own check."""

    def config(self) -> dict[str, Any]:
        """The hyperparameters: the source of ``repr`` and part of the job key."""
        return table_config(self)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The input transformation, on images in [0, 1]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError(f"{self!r} wraps no model")
        xt = self.transform(x)
        if not self.differentiable:
            # No gradient flows through a non-differentiable transform; "0 * x" keeps the
            # graph connected so attacks see zeros instead of an autograd error.
            xt = xt.detach() + 0 * x
        return self.model(xt)

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted labels, accepted) as deployed; only rejecting defenses refuse."""
        with torch.no_grad():
            pred = self(x).argmax(dim=1)
        return pred, torch.ones_like(pred, dtype=torch.bool)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Build the state from training images and labels (``needs_fit`` defenses)."""
        raise NotImplementedError(f"{self.name} is not fitted from data")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors (stored as safetensors: data, not code)."""
        raise NotImplementedError(f"{self.name} has no fitted state")

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned; GauntletError if it does not fit."""
        raise NotImplementedError(f"{self.name} has no fitted state")

    def bpda_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same output as ``forward``; the backward pass treats the transform as identity."""
        xt = self.transform(x)
        return self.model(x + (xt - x).detach())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise TypeError(f"Expected a Defense subclass, but got {cls!r}")
    return DEFENSES.register(cls)


def build_defense(
    name: str, params: Mapping[str, Any] | None, model: torch.nn.Module | None
) -> Defense:
    """The defense ``name`` with ``params`` around ``model``; GauntletError if unknown."""
    return configure(DEFENSES, name, params, model)


def validate_defense(name: str, params: Mapping[str, Any] | None) -> None:
    build_defense(name, params, None)
