"""The ``calibration`` job kind: how well a model's confidence matches its accuracy.

On the evaluation subset: ECE/MCE (15 equal-width bins), adaptive and class-wise ECE,
NLL, Brier, mean confidence and confident errors; temperature scaling fitted on a
held-out split with the numbers after it; the same metrics on adversarial examples (when
the job has a threat); and a reliability diagram stored as a PNG artifact.

The held-out split is the test points outside the evaluation subset: never trained on,
never scored. When there are too few of them (a subset covering the test split), the job
reports no temperature and says why, rather than fit on the training split, where the
model's confidence is the one it learned and says nothing about unseen points.
"""

from __future__ import annotations

import numpy as np
import torch

from gauntlet.workers.attacks import Threat, build_attack
from gauntlet.workers.batches import predict_in_batches
from gauntlet.workers.calibration import metrics as calibration
from gauntlet.workers.calibration.diagram import reliability_bins, reliability_diagram_png
from gauntlet.workers.context import JobContext
from gauntlet.workers.datasets import load_split
from gauntlet.workers.defenses.adaptive import attack_surface
from gauntlet.workers.jobs import HOUR, JobKind, register_kind
from gauntlet.workers.results import JobResult, Metric

# Held-out points for fitting the temperature (Guo et al. fit on a validation split).
HOLDOUT = 500
# Fewer held-out points than this: one scalar fitted on them would be mostly noise.
MIN_HOLDOUT = 50
# details["temperature_split"]: where the temperature was fitted, or None.
HELD_OUT_SPLIT = "test outside the evaluation subset"


def holdout_split(dataset: str, data_root, indices: torch.Tensor, seed: int):
    """(x, y, test indices) of up to HOLDOUT test points outside the evaluation subset.

    Seeded, and disjoint from ``indices``; None when fewer than MIN_HOLDOUT remain.
    """
    x, y = load_split(dataset, "test", data_root)
    rest = np.setdiff1d(np.arange(len(y)), indices.cpu().numpy())
    if len(rest) < MIN_HOLDOUT:
        return None
    rng = np.random.default_rng(seed + 1)
    chosen = torch.from_numpy(np.sort(rng.permutation(rest)[:HOLDOUT]).astype(np.int64))
    return x[chosen], y[chosen], chosen


def _no_holdout_note(n_test: int, n_eval: int) -> str:
    return (
        f"no temperature: the evaluation subset covers {n_eval} of the {n_test} test points, "
        f"leaving fewer than {MIN_HOLDOUT} held out, and the training split is what the "
        "model learned from, so a temperature fitted there would not be a held-out one"
    )


def _temperature(ctx: JobContext, logits: torch.Tensor, y: torch.Tensor, indices):
    """(metrics, details): before and, with a held-out split, after temperature scaling."""
    held_out = holdout_split(ctx.dataset, ctx.data_root, indices, ctx.seed)
    if held_out is None:
        n_test = len(load_split(ctx.dataset, "test", ctx.data_root)[1])
        note = _no_holdout_note(n_test, len(indices))
        before = calibration.calibration_metrics(logits, y)
        return before, {"temperature": None, "temperature_split": None, "temperature_note": note}
    x_fit, y_fit, fit_indices = held_out
    fit_logits = predict_in_batches(ctx.defended, x_fit.to(ctx.device), ctx.batch_size)
    temperature, before, after = calibration.temperature_report(fit_logits.cpu(), y_fit, logits, y)
    details = {
        "temperature": temperature,
        "temperature_split": HELD_OUT_SPLIT,
        "temperature_n": len(y_fit),
    }
    return [*before, *after, Metric("temperature", temperature, len(y_fit))], details


def run(ctx: JobContext) -> JobResult:
    spec, model, batch_size = ctx.spec, ctx.defended, ctx.batch_size
    x, y, indices = ctx.eval_data
    logits = predict_in_batches(model, x, batch_size)
    metrics, details = _temperature(ctx, logits.cpu(), y.cpu(), indices)
    probs = torch.softmax(logits.cpu().double(), dim=1)
    png = reliability_diagram_png(probs, y.cpu(), title=ctx.dataset)
    details = {
        **details,
        "reliability_diagram": ctx.store.put_bytes(png),
        # The bins themselves, so the web page can redraw the diagram without the model.
        "reliability": reliability_bins(probs, y.cpu()),
    }
    robust = logits.argmax(1) == y
    if spec.get("norm") is not None:
        # Confidence under attack: models are confidently wrong off the data distribution.
        # The attack goes through the same adaptive surface (BPDA, EOT) as an eval job's:
        # attacking a defense's forward pass alone would flatter its confidence.
        surface, adaptations = attack_surface(
            model, adaptive=spec.get("adaptive", True), eot_samples=spec.get("eot_samples", 10)
        )
        attack = build_attack(spec["attack"], ctx.params)
        threat = Threat(spec["norm"], float(spec["eps"]))
        generator = torch.Generator(device=x.device).manual_seed(ctx.seed)
        result = attack(surface, x, y, threat, batch_size=batch_size, generator=generator)
        adv_logits = predict_in_batches(model, result.x_adv, batch_size)
        metrics += calibration.calibration_metrics(adv_logits.cpu(), y.cpu(), prefix="adv_")
        details["attack_config"] = repr(attack)
        details["adaptations"] = adaptations
        robust = adv_logits.argmax(1) == y
    ctx.report(len(y), len(y))
    clean = logits.argmax(1) == y
    return ctx.result(metrics, clean, clean & robust, details)


register_kind(JobKind("calibration", run, board="calibration", time_limit_s=2 * HOUR))
