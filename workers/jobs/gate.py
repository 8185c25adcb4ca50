"""The submission gate: a few cheap checks on a small probe before any other job runs.

A model left in train mode, one that returns probabilities, one whose gradients are
masked or one far from the clean accuracy its card claims would each waste every job
of its suite, or worse, look robust. The gate runs first, on ``PROBE_POINTS`` points of
the evaluation split, and its verdict decides whether the scheduler queues the rest
(``gauntlet.scheduler.gate``). Failures stop the model; flags are only recorded.

The clean-accuracy rule is statistical: 64 points measure accuracy to within several
points, so the claim fails only when it lies more than ``CLAIM_TOLERANCE`` outside the
probe's 95% Wilson interval (never inside the interval's own noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.jobs import JobKind, check_procedure, register_kind
from gauntlet.workers.results import JobResult, wilson_interval

PROCEDURE = "submission"
PROBE_POINTS = 64
CLAIM_TOLERANCE = 0.03  # 3 points, beyond the probe's interval
# Exactly-zero input gradients on more than this share of points: no signal to attack.
ZERO_GRADIENT_SHARE = 0.5
# A median per-point largest |d loss / d x| below this is a flag (saturated softmax):
# attacks still get a direction, but float32 step sizes may not move it.
TINY_GRADIENT = 1e-7

_PARAMS = ("suite", "suite_n", "claimed_clean", "randomized")


def check_gate(procedure: str, params: dict) -> dict:
    """The gate's settings as keyed: the suite it releases, the claim, the declaration."""
    check_procedure(
        procedure, (PROCEDURE,), params, _PARAMS, what="gate", params_what="gate parameter(s)"
    )
    claimed = params.get("claimed_clean")
    ok = claimed is None or (
        isinstance(claimed, (int, float)) and not isinstance(claimed, bool) and 0 <= claimed <= 100
    )
    if not ok:
        raise GauntletError(f"Expected `claimed_clean` to be a percentage, but got {claimed!r}")
    if not isinstance(params.get("randomized", False), bool):
        raise GauntletError("Expected `randomized` to be true or false")
    suite = params.get("suite")
    if not isinstance(suite, dict) or "name" not in suite:
        raise GauntletError("the gate needs the suite it releases (`suite` with a `name`)")
    return {
        "suite": suite,
        "suite_n": params.get("suite_n"),
        "claimed_clean": None if claimed is None else float(claimed),
        "randomized": bool(params.get("randomized", False)),
    }


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    correct: torch.Tensor | None = None
    interval: tuple[float, float] = (0.0, 1.0)

    @property
    def passed(self) -> bool:
        return not self.failures


def _input_gradients(model, x, y) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def probe(model, x, y, *, randomized: bool = False, claimed: float | None = None) -> Verdict:
    """The gate's checks of ``model`` (pixel space in, scores out) on (x, y).

    ``claimed`` is the card's clean accuracy in percent; ``randomized`` skips the
    determinism check (a declared random defense is evaluated with EOT instead).
    """
    verdict = Verdict()
    with torch.no_grad():
        first = model(x)
        second = None if randomized else model(x)
    if not torch.isfinite(first).all():
        verdict.failures.append("outputs contain NaN or infinity")
        return verdict
    if second is not None and not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        gap = (first - second).abs().max().item()
        verdict.failures.append(
            f"two forward passes on the same input differ (by up to {gap:.3g}): the model is "
            "random or left in train mode; put it in eval mode, or declare `randomized: true` "
            "in its card"
        )
    rows = first.sum(dim=1)
    if bool((first >= 0).all() and (first <= 1).all()) and torch.allclose(
        rows, torch.ones_like(rows), atol=1e-3
    ):
        verdict.failures.append(
            "outputs are probabilities (each row in [0, 1], summing to 1), not logits: "
            "return the scores before the softmax"
        )
    grad = _input_gradients(model, x, y).flatten(1)
    if not torch.isfinite(grad).all():
        verdict.failures.append("input gradients contain NaN or infinity")
    else:
        largest = grad.abs().amax(dim=1)
        zero = (largest == 0).float().mean().item()
        if zero > ZERO_GRADIENT_SHARE:
            verdict.failures.append(
                f"input gradients are exactly zero on {zero:.0%} of the probe: white-box "
                "attacks get no signal (a rounding or other non-differentiable step inside "
                "the model?)"
            )
        elif largest.median().item() < TINY_GRADIENT:
            verdict.flags.append(
                f"input gradients are tiny (median largest |d loss/dx| "
                f"{largest.median().item():.2g}): a saturated softmax or a gradient scaled away"
            )
        elif zero > 0:
            verdict.flags.append(f"input gradients are exactly zero on {zero:.0%} of the probe")
    verdict.correct = first.argmax(dim=1) == y
    k, n = int(verdict.correct.sum()), len(y)
    verdict.interval = wilson_interval(k, n)
    if claimed is not None:
        low, high = verdict.interval
        claim = claimed / 100
        if claim < low - CLAIM_TOLERANCE or claim > high + CLAIM_TOLERANCE:
            verdict.failures.append(
                f"clean accuracy {k / n:.1%} on the {n}-point probe (95% CI {low:.1%}-"
                f"{high:.1%}): the claimed {claimed:g}% is more than {100 * CLAIM_TOLERANCE:g} "
                "points outside it; check the normalisation (mean and std), the class order "
                "and the card"
            )
    return verdict


def run(ctx) -> JobResult:
    settings = check_gate(ctx.spec["attack"], ctx.params)
    x, y, _ = ctx.eval_data
    model = ctx.net
    verdict = probe(
        model, x, y, randomized=settings["randomized"], claimed=settings["claimed_clean"]
    )
    correct = verdict.correct if verdict.correct is not None else torch.zeros_like(y, dtype=bool)
    low, high = verdict.interval
    details = {
        "gate": {
            "passed": verdict.passed,
            "failures": verdict.failures,
            "flags": verdict.flags,
            "probe": len(y),
            "claimed_clean": settings["claimed_clean"],
            "randomized": settings["randomized"],
            "interval": [low, high],
        },
        "flags": list(verdict.flags),
    }
    metrics = [ctx.accuracy("probe_clean_accuracy", correct)]
    return ctx.result(metrics, correct, correct, details)


# A few forward and backward passes on 64 points: minutes at most, even on a big model.
register_kind(JobKind("gate", run, board="jobs", check=check_gate, time_limit_s=600.0))
