"""The ``calibration`` job kind: how well a model's confidence matches its accuracy.

On the evaluation subset: ECE/MCE (15 equal-width bins), adaptive and class-wise ECE,
NLL, Brier, mean confidence and confident errors; temperature scaling fitted on a
held-out split (test points outside the subset, so never the points it is scored on)
with the numbers after it; the same metrics on adversarial examples (when the job has
a threat); and a reliability diagram stored as a PNG artifact.
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
from gauntlet.workers.jobs import HOUR, JobKind, register_kind
from gauntlet.workers.results import JobResult, Metric

# Held-out points for fitting the temperature (Guo et al. fit on a validation split).
HOLDOUT = 500


def holdout_split(dataset: str, data_root, indices: torch.Tensor, seed: int):
    """Test points outside the evaluation subset; the training split's tail if none."""
    x, y = load_split(dataset, "test", data_root)
    rest = np.setdiff1d(np.arange(len(y)), indices.cpu().numpy())
    if len(rest) == 0:
        x, y = load_split(dataset, "train", data_root)
        rest = np.arange(len(y))[-HOLDOUT:]
    rng = np.random.default_rng(seed + 1)
    chosen = np.sort(rng.permutation(rest)[:HOLDOUT])
    return x[chosen], y[chosen]


def run(ctx: JobContext) -> JobResult:
    spec, model, batch_size = ctx.spec, ctx.defended, ctx.batch_size
    x, y, indices = ctx.eval_data
    logits = predict_in_batches(model, x, batch_size)
    x_fit, y_fit = holdout_split(ctx.dataset, ctx.data_root, indices, ctx.seed)
    fit_logits = predict_in_batches(model, x_fit.to(ctx.device), batch_size)
    temperature, before, after = calibration.temperature_report(
        fit_logits.cpu(), y_fit, logits.cpu(), y.cpu()
    )
    metrics = [*before, *after, Metric("temperature", temperature, len(y_fit))]
    probs = torch.softmax(logits.cpu().double(), dim=1)
    png = reliability_diagram_png(probs, y.cpu(), title=ctx.dataset)
    details = {
        "temperature": temperature,
        "reliability_diagram": ctx.store.put_bytes(png),
        # The bins themselves, so the web page can redraw the diagram without the model.
        "reliability": reliability_bins(probs, y.cpu()),
    }
    robust = logits.argmax(1) == y
    if spec.get("norm") is not None:
        # Confidence under attack: models are confidently wrong off the data distribution.
        attack = build_attack(spec["attack"], ctx.params)
        threat = Threat(spec["norm"], float(spec["eps"]))
        generator = torch.Generator(device=x.device).manual_seed(ctx.seed)
        result = attack(model, x, y, threat, batch_size=batch_size, generator=generator)
        adv_logits = predict_in_batches(model, result.x_adv, batch_size)
        metrics += calibration.calibration_metrics(adv_logits.cpu(), y.cpu(), prefix="adv_")
        details["attack_config"] = repr(attack)
        robust = adv_logits.argmax(1) == y
    ctx.report(len(y), len(y))
    clean = logits.argmax(1) == y
    return ctx.result(metrics, clean, clean & robust, details)


register_kind(JobKind("calibration", run, board="calibration", time_limit_s=2 * HOUR))
