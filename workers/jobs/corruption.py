"""The ``corruption`` job kind: accuracy and calibration under common corruptions
(Hendrycks & Dietterich 2019), five severities each, on the deployed model."""

from __future__ import annotations

from gauntlet.workers.batches import predict_in_batches
from gauntlet.workers.context import JobContext
from gauntlet.workers.corruptions import corruption_metrics
from gauntlet.workers.jobs import HOUR, JobKind, register_kind
from gauntlet.workers.results import JobResult


def run(ctx: JobContext) -> JobResult:
    defended, batch_size = ctx.defended, ctx.batch_size
    x, y, _ = ctx.eval_data
    clean = predict_in_batches(defended, x, batch_size).argmax(1) == y
    metrics = [
        ctx.accuracy("clean_accuracy", clean),
        *corruption_metrics(defended, x, y, batch_size=batch_size, seed=ctx.seed),
    ]
    ctx.report(len(y), len(y))
    return ctx.result(metrics, clean, clean, {})


# Forward passes only, but over every corruption at every severity.
register_kind(JobKind("corruption", run, board="corruption", time_limit_s=2 * HOUR))
