"""Perturbation Rectifying Network (Akhtar, Liu & Mian, CVPR 2018), against universal noise.

Three parts sit in front of the frozen classifier:

- the *rectifier*: a small residual conv net, image to image, R(x) = clamp(x + r(x), 0, 1).
  The paper's PRN is a stack of ResNet blocks for ImageNet; here a stem, two residual
  blocks of ``_WIDTH`` channels and an output conv, zero-initialised so that training
  starts from the identity (the clean accuracy the classifier has);
- the *detector*: the paper's features, log-absolute 2-D DCT coefficients of the
  rectifier's input-output difference R(x) - x (a universal perturbation leaves a
  structured residual, clean images a small, unstructured one), standardised with
  statistics of the training features. The paper scores them with a binary SVM; here a
  logistic classifier (one linear layer), trained with the rest;
- the *gate*: as deployed, the classifier sees R(x) where the detector says "perturbed"
  (probability >= 0.5), and x itself otherwise.

``forward`` is the deployed model with a straight-through gate: its value is the hard
gate's, its gradient the soft gate's (the detector's sigmoid). So gradients flow through
the rectifier *and* the detector's decision, ``differentiable`` is True, and the
adaptive attack surface is this module itself, with no BPDA. A non-adaptive attack
(``adaptive: false``) is crafted on the bare classifier (``oblivious_surface``; the job's
adaptations say ``bare-model``), the paper's setting, and judged here.

The rectifier and detector are fitted (``workers.defenses.prn_training``) on the
training split with universal perturbations crafted on the classifier, and kept as the
defense's state; the ``train`` job's method ``prn`` runs the same fit ahead of the
evaluations and records what it measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.defenses.base import Defense, register_defense
from gauntlet.workers.hyperparams import integer, one_of, real

# Channels of the rectifier's hidden layers: ample for 8x8 to 32x32 inputs, small enough
# that fitting on a CPU takes seconds on digits.
_WIDTH = 32
# Added before the log of |DCT|: the residual of a clean image is near zero, and log 0
# (or its infinite gradient) must not reach the detector.
_LOG_FLOOR = 1e-4
# What ``stats`` holds, in order: measured on held-out training images at fit time.
STATS = (
    "heldout_points",
    "bare_clean_accuracy",
    "bare_perturbed_accuracy",
    "defended_clean_accuracy",
    "defended_perturbed_accuracy",
    "detector_clean_accuracy",
    "detector_perturbed_accuracy",
)


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, h):
        return torch.relu(h + self.body(h))


class Rectifier(nn.Module):
    """R(x) = clamp(x + r(x), 0, 1): the identity until trained (zero last layer)."""

    def __init__(self, channels: int, width: int = _WIDTH):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(_Block(width), _Block(width))
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return (x + self.out(self.blocks(self.stem(x)))).clamp(0.0, 1.0)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix: row k is sqrt(2/n) cos(pi (i + 1/2) k / n)."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    basis = math.sqrt(2.0 / n) * torch.cos(math.pi * (i[None, :] + 0.5) * k / n)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


class Detector(nn.Module):
    """P(perturbed) from the standardised log |2-D DCT| of a residual: logistic regression."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.register_buffer("dct_h", dct_matrix(height))
        self.register_buffer("dct_w", dct_matrix(width))
        size = channels * height * width
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))
        self.linear = nn.Linear(size, 1)

    def features(self, residual: torch.Tensor) -> torch.Tensor:
        coefficients = self.dct_h @ residual @ self.dct_w.T  # per channel, per image
        return torch.log(coefficients.abs() + _LOG_FLOOR).flatten(1)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """The logit of "perturbed", from ``features`` (unstandardised)."""
        return self.linear((features - self.mean) / self.std).squeeze(1)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(residual))


@register_defense
class PRN(Defense):
    """Rectify inputs the detector flags as universally perturbed, pass the rest unchanged.

    Fitted for a threat (``norm``, ``eps``): set them to the evaluation's budget.
    ``perturbations`` universal perturbations are crafted on the classifier (each with
    its own seed) and ``synthetic`` more are drawn around them; ``train_points`` training
    images (a seeded sample) are used, a fifth of them held out to measure the fit;
    ``epochs`` is the rectifier's training length.
    """

    name = "prn"
    needs_fit = True
    fit_uses_model = True

    hyperparams = {
        "norm": one_of("linf", ("linf", "l2")),
        "eps": real(8 / 255, 0.0, 1e3),
        "perturbations": integer(5, 1, 100),
        "synthetic": integer(5, 0, 1000),
        "epochs": integer(20, 1, 1000),
        "train_points": integer(2000, 10, 10_000_000),
        "seed": integer(0, 0),
    }

    def prepare(self) -> None:
        # Built at fit or load time, when the image shape is known.
        self.rectifier: Rectifier | None = None
        self.detector: Detector | None = None
        self.perturbation_bank: torch.Tensor | None = None
        self.stats: torch.Tensor | None = None

    # -- the deployed model -------------------------------------------------------------

    def _fitted(self) -> tuple[Rectifier, Detector]:
        if self.rectifier is None or self.detector is None:
            raise GauntletError("prn is not fitted yet: fit it on training images first")
        return self.rectifier, self.detector

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rectified x, gate): the gate is 1 where the detector flags x, straight-through."""
        rectifier, detector = self._fitted()
        rectified = rectifier(x)
        soft = torch.sigmoid(detector(rectified - x))
        hard = (soft >= 0.5).to(x.dtype)
        # Forward: the hard decision as deployed; backward: the sigmoid's gradient.
        return rectified, hard + soft - soft.detach()

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        rectified, gate = self.gate(x)
        return x + gate.view(-1, 1, 1, 1) * (rectified - x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError(f"{self!r} wraps no model")
        return self.model(self.transform(x))

    def oblivious_surface(self) -> torch.nn.Module:
        """What a non-adaptive attack is crafted on: the bare classifier (the paper's setting)."""
        if self.model is None:
            raise GauntletError("prn wraps no model")
        return self.model

    # -- fitted state -------------------------------------------------------------------

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from gauntlet.workers.defenses.prn_training import fit_prn

        if self.model is None:
            raise GauntletError("prn needs the model it defends before it can be fitted")
        fitted = fit_prn(self, x, y)
        self.rectifier, self.detector = fitted.rectifier, fitted.detector
        self.perturbation_bank, self.stats = fitted.perturbations, fitted.stats

    def report(self) -> dict:
        """What the fit measured (``STATS``) and the perturbations it trained on."""
        if self.stats is None or self.perturbation_bank is None:
            raise GauntletError("prn is not fitted yet: fit it on training images first")
        report: dict = dict(zip(STATS, (float(v) for v in self.stats), strict=True))
        report["heldout_points"] = int(report["heldout_points"])
        bank = self.perturbation_bank.flatten(1)
        report["perturbations"] = {
            "universal": self.perturbations,
            "synthetic": self.synthetic,
            "linf_norms": [round(float(v), 6) for v in bank.abs().amax(1)],
            "l2_norms": [round(float(v), 6) for v in bank.norm(dim=1)],
        }
        return report

    def state_tensors(self) -> dict[str, torch.Tensor]:
        rectifier, detector = self._fitted()
        assert self.perturbation_bank is not None and self.stats is not None
        tensors = {f"rectifier.{k}": v for k, v in rectifier.state_dict().items()}
        tensors |= {f"detector.{k}": v for k, v in detector.state_dict().items()}
        return tensors | {"perturbations": self.perturbation_bank, "stats": self.stats}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        bank = tensors.get("perturbations")
        if bank is None or bank.dim() != 4 or "stats" not in tensors:
            raise GauntletError("prn state has no perturbation bank or statistics")
        _, channels, height, width = bank.shape
        rectifier, detector = Rectifier(channels), Detector(channels, height, width)
        for prefix, module in (("rectifier.", rectifier), ("detector.", detector)):
            part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(part)
            except RuntimeError as exc:  # missing keys or other shapes: refit instead
                raise GauntletError(f"prn state does not fit its modules: {exc}") from exc
        device = next(self.model.parameters()).device if self.model is not None else "cpu"
        self.rectifier, self.detector = rectifier.to(device).eval(), detector.to(device).eval()
        self.perturbation_bank, self.stats = bank, tensors["stats"]
