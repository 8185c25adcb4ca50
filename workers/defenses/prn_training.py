"""Fitting the Perturbation Rectifying Network (Akhtar et al. 2018) on the training split.

The steps of the paper, at this service's scale:

1. Universal perturbations crafted on the frozen classifier (``workers.attacks.universal``,
   one per seed, each on its own sample of training points), and synthetic ones drawn
   around them. The paper synthesises perturbations whose statistics match the crafted
   ones; here each synthetic one is a random Gaussian mix of the crafted ones plus
   Gaussian noise, mapped onto the ball's surface (the sign for Linf, rescaled for L2):
   cheaper, and it still covers the span the crafted ones lie in.
2. The rectifier, trained so the classifier's output on rectified images matches its
   label for the clean image: cross-entropy to the classifier's clean prediction, on
   batches where each image is clean or carries a random perturbation of the bank with
   probability 1/2 (clean images must pass the rectifier unharmed). The classifier is
   frozen and stays in eval mode; the loop is ``workers.training.fit``.
3. The detector, a logistic classifier on the DCT features of the rectifier's residual,
   trained on the same images, each once clean and once perturbed.

A fifth of the sampled images is held out from 2 and 3; the fit reports the bare and the
defended classifier's accuracy there, clean and under perturbations of the bank, and how
often the detector is right on either.

The ``train`` job's method ``prn`` (``run_prn``) runs this fit through the same path an
evaluation with ``defense: prn`` takes (``prepare_defense``), so it stores the state the
evaluations with the same settings then load, and records what the fit measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.base import Threat
from gauntlet.workers.attacks.norms import get_norm
from gauntlet.workers.attacks.universal import Universal
from gauntlet.workers.batches import predict_in_batches
from gauntlet.workers.defenses.base import build_defense
from gauntlet.workers.defenses.prn import STATS, Detector, Rectifier
from gauntlet.workers.defenses.state import prepare_defense
from gauntlet.workers.results import JobResult, Metric
from gauntlet.workers.training import fit

# Training points per universal perturbation and its epochs: the attack's own defaults.
_UAP_POINTS, _UAP_EPOCHS = 500, 10
_BATCH = 64
_RECTIFIER_LR = 1e-3
# A linear model on standardised features: a larger step, a few passes.
_DETECTOR_LR, _DETECTOR_EPOCHS = 1e-2, 30
_HELDOUT_SHARE = 0.2
_SEED_STRIDE = 1_000_003


@dataclass
class FittedPRN:
    rectifier: Rectifier
    detector: Detector
    perturbations: torch.Tensor  # (k, C, H, W): the bank trained on, on the CPU
    stats: torch.Tensor  # the values named in ``prn.STATS``


class _Rectified(torch.nn.Module):
    """The classifier behind the rectifier: what the rectifier's training loss sees."""

    def __init__(self, rectifier: Rectifier, classifier: torch.nn.Module):
        super().__init__()
        self.rectifier, self.classifier = rectifier, classifier

    def forward(self, x):
        return self.classifier(self.rectifier(x))


def craft_bank(model, x, y, threat: Threat, *, universal: int, synthetic: int, seed: int):
    """``universal`` perturbations crafted on ``model``, then ``synthetic`` drawn around them."""
    # Seeds far from the small ones evaluations use: a universal attack in an eval job
    # (seeded with the job's seed) crafts a perturbation the rectifier never saw.
    base = _SEED_STRIDE * (seed + 1)
    bank = []
    for i in range(universal):
        attack = Universal(fit_points=min(_UAP_POINTS, len(x)), epochs=_UAP_EPOCHS)
        attack.fit(model, x, y, threat, torch.Generator().manual_seed(base + i))
        assert attack.delta is not None
        bank.append(attack.delta[0].detach())
    crafted = torch.stack(bank)
    generator = torch.Generator().manual_seed(base + universal)
    norm = get_norm(threat.norm)
    for _ in range(synthetic):
        weights = torch.randn(len(crafted), generator=generator).to(crafted.device)
        noise = torch.randn(crafted.shape[1:], generator=generator).to(crafted.device)
        mix = (weights.view(-1, 1, 1, 1) * crafted).sum(0) + 0.1 * threat.eps * noise
        # Onto the surface of the ball, where the crafted ones end up too.
        bank.append(threat.eps * norm.normalise(mix[None])[0])
    return torch.stack(bank)


def _perturb(bank: torch.Tensor, generator: torch.Generator, share: float = 0.5):
    """``perturb`` for ``fit``: each image gets a random bank entry with probability ``share``."""

    def perturb(model, xb, yb):
        n = len(xb)
        pick = torch.randint(len(bank), (n,), generator=generator).to(xb.device)
        on = (torch.rand(n, generator=generator) < share).to(xb.device, xb.dtype)
        return (xb + on.view(-1, 1, 1, 1) * bank[pick]).clamp(0.0, 1.0)

    return perturb


def _with_bank(x: torch.Tensor, bank: torch.Tensor, generator: torch.Generator):
    pick = torch.randint(len(bank), (len(x),), generator=generator).to(x.device)
    return (x + bank[pick]).clamp(0.0, 1.0)


def _sample(x, y, count: int, seed: int):
    """Up to ``count`` images in a seeded random order: the last fifth is a fair hold-out
    whatever order the split is stored in."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    pick = order[:count].to(x.device)
    return x[pick], y[pick]


def fit_prn(defense, x: torch.Tensor, y: torch.Tensor) -> FittedPRN:
    """Craft the bank on ``defense.model``, then train its rectifier and detector."""
    classifier = defense.model
    device = next(classifier.parameters()).device
    x, y = _sample(x.to(device), y.to(device), defense.train_points, defense.seed)
    heldout = max(1, int(len(x) * _HELDOUT_SHARE))
    if len(x) - heldout < _BATCH // 4:
        raise GauntletError(
            f"prn got {len(x)} training images: too few to fit on and hold out a fifth"
        )
    threat = Threat(defense.norm, defense.eps)
    was_training = classifier.training
    classifier.eval()
    # The caller may hold autograd off (fitting is usually pure data work); this is not.
    with torch.enable_grad():
        try:
            fitted = _fit(defense, classifier, x, y, heldout, threat)
        finally:
            classifier.train(was_training)
            for p in classifier.parameters():
                p.grad = None  # the frozen classifier's gradients were only passed through
    return fitted


def _fit(defense, classifier, x, y, heldout: int, threat: Threat) -> FittedPRN:
    x_fit, y_fit = x[:-heldout], y[:-heldout]
    bank = craft_bank(
        classifier,
        x_fit,
        y_fit,
        threat,
        universal=defense.perturbations,
        synthetic=defense.synthetic,
        seed=defense.seed,
    )
    generator = torch.Generator().manual_seed(defense.seed)
    torch.manual_seed(defense.seed)  # the rectifier's and detector's initial weights
    channels, height, width = x.shape[1:]
    rectifier = Rectifier(channels).to(x.device)
    detector = Detector(channels, height, width).to(x.device)

    # 2. The rectifier: the classifier's clean labels are the targets.
    labels = predict_in_batches(classifier, x_fit, 512, output=lambda out: out.argmax(1))
    rectified = _Rectified(rectifier, classifier)
    fit(
        rectified,
        x_fit,
        labels,
        epochs=defense.epochs,
        lr=_RECTIFIER_LR,
        batch_size=_BATCH,
        generator=generator,
        perturb=_perturb(bank, generator),
        params=rectifier.parameters(),
        train_mode=False,  # the classifier's BatchNorm statistics must not move
    )

    # 3. The detector: every fitting image once clean (0), once perturbed (1).
    with torch.no_grad():
        both = torch.cat([x_fit, _with_bank(x_fit, bank, generator)])
        features = predict_in_batches(lambda b: detector.features(rectifier(b) - b), both, 512)
        detector.mean.copy_(features.mean(0))
        detector.std.copy_(features.std(0).clamp_min(1e-6))
    targets = torch.cat([torch.zeros(len(x_fit)), torch.ones(len(x_fit))]).to(x.device)
    scorer = _Scorer(detector)
    fit(
        scorer,
        features,
        targets,
        epochs=_DETECTOR_EPOCHS,
        lr=_DETECTOR_LR,
        batch_size=_BATCH * 2,
        generator=generator,
        loss=F.binary_cross_entropy_with_logits,
        params=detector.linear.parameters(),
    )
    rectifier.eval(), detector.eval()
    held = (x[-heldout:], y[-heldout:])
    stats = _held_out_stats(classifier, rectifier, detector, *held, bank, generator)
    return FittedPRN(rectifier, detector, bank.detach().cpu(), stats)


class _Scorer(torch.nn.Module):
    """The detector's logit from precomputed features (the rectifier is fixed by now)."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector

    def forward(self, features):
        return self.detector.score(features)


@torch.no_grad()
def _held_out_stats(classifier, rectifier, detector, x, y, bank, generator) -> torch.Tensor:
    """The values of ``prn.STATS`` on the held-out images (accuracies against ``y``)."""
    x_pert = _with_bank(x, bank, generator)

    def deployed(images):
        rectified = rectifier(images)
        flagged = detector(rectified - images) >= 0  # sigmoid >= 0.5
        chosen = torch.where(flagged.view(-1, 1, 1, 1), rectified, images)
        return classifier(chosen).argmax(1), flagged

    pred_clean, flag_clean = deployed(x)
    pred_pert, flag_pert = deployed(x_pert)
    values = [
        float(len(x)),
        (classifier(x).argmax(1) == y).float().mean().item(),
        (classifier(x_pert).argmax(1) == y).float().mean().item(),
        (pred_clean == y).float().mean().item(),
        (pred_pert == y).float().mean().item(),
        (~flag_clean).float().mean().item(),
        flag_pert.float().mean().item(),
    ]
    return torch.tensor(values)


# -- the train job's method ``prn`` ------------------------------------------------------


def check_prn(params: dict) -> dict:
    """The prn defense's settings with defaults; ``suite`` (every train job has one) aside."""
    settings = {k: v for k, v in params.items() if k != "suite"}
    return build_defense("prn", settings, None).config()


def run_prn(ctx) -> JobResult:
    """Fit (or load) the prn state for the job's model; record the fit and clean accuracy.

    No derived model comes out: the product is the defense's state, under the key the
    evaluations with ``defense: prn`` and the same settings look up.
    """
    settings = check_prn(ctx.params)
    defense = build_defense("prn", settings, ctx.net).eval()
    sha = prepare_defense(
        defense,
        dataset=ctx.dataset,
        model_sha=ctx.model.get("weights_sha256"),
        artifacts=ctx.artifacts,
        data_root=ctx.data_root,
    )
    ctx.defense_state = sha
    report = defense.report()
    x, y, _ = ctx.eval_data
    bare = predict_in_batches(ctx.net, x, ctx.batch_size).argmax(1) == y
    defended = predict_in_batches(defense, x, ctx.batch_size).argmax(1) == y
    metrics = [
        ctx.accuracy("bare_clean_accuracy", bare),
        ctx.accuracy("prn_clean_accuracy", defended),
    ]
    heldout = report["heldout_points"]
    metrics += [Metric(f"heldout_{name}", report[name], heldout) for name in STATS[1:]]
    details = {
        "method": "prn",
        "settings": settings,
        "defense": "prn",
        "defense_params": settings,
        "fit": report,
    }
    if ctx.progress:
        ctx.progress(1, 1)
    return ctx.result(metrics, bare, bare, details)
