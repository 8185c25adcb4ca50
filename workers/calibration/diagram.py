"""A reliability diagram as PNG bytes, for storing as a job artifact.

Uses matplotlib's object API with the Agg canvas rather than pyplot: no display is needed
and no global figure state is shared between worker threads.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gauntlet.workers.calibration.metrics import bin_stats


def reliability_diagram_png(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, title: str = ""
) -> bytes:
    """Accuracy per equal-width confidence bin against the diagonal, with the gaps shaded.

    ``probs`` are softmax probabilities (N, K); validation errors are GauntletError.
    """
    bins = bin_stats(probs, labels, n_bins)
    ece_value = bins.weighted_gap()
    lo = bins.lo.numpy()
    width = (bins.hi - bins.lo).numpy()
    accuracy = bins.accuracy.numpy()
    confidence = bins.confidence.numpy()
    # Empty bins are drawn at height 0 with no gap, so they read as "no data" not "wrong".
    non_empty = (bins.count > 0).numpy()

    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(
        lo,
        accuracy,
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="Accuracy",
    )
    gap_bottom = np.minimum(accuracy, confidence)
    gap_height = np.where(non_empty, np.abs(accuracy - confidence), 0.0)
    axes.bar(
        lo,
        gap_height,
        bottom=gap_bottom,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.4,
        edgecolor="tab:red",
        hatch="//",
        label="Gap",
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("Confidence")
    axes.set_ylabel("Accuracy")
    heading = f"ECE = {100 * ece_value:.2f}%"
    axes.set_title(f"{title}\n{heading}" if title else heading)
    axes.legend(loc="upper left")
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
