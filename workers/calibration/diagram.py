"""The reliability diagram: its data (JSON-ready bins) and its drawing.

The calibration job stores the bins with its details, so a page can draw the same
diagram again (as SVG) without the model's probabilities; the job's PNG artifact is the
same drawing. Uses matplotlib's object API with the Agg canvas rather than pyplot: no
display is needed and no global figure state is shared between worker threads.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gauntlet.workers.calibration.metrics import bin_stats


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Equal-width confidence bins as plain lists: lo, hi, accuracy, confidence, count, ece.

    ``probs`` are softmax probabilities (N, K); validation errors are GauntletError.
    """
    bins = bin_stats(probs, labels, n_bins)
    return {
        "lo": [float(v) for v in bins.lo],
        "hi": [float(v) for v in bins.hi],
        "accuracy": [float(v) for v in bins.accuracy],
        "confidence": [float(v) for v in bins.confidence],
        "count": [int(v) for v in bins.count],
        "ece": float(bins.weighted_gap()),
    }


def draw_reliability(axes, bins: dict, title: str = "") -> None:
    """Accuracy per bin against the diagonal, with the gaps shaded, on ``axes``."""
    lo = np.asarray(bins["lo"], dtype=float)
    width = np.asarray(bins["hi"], dtype=float) - lo
    accuracy = np.asarray(bins["accuracy"], dtype=float)
    confidence = np.asarray(bins["confidence"], dtype=float)
    # Empty bins are drawn at height 0 with no gap, so they read as "no data" not "wrong".
    non_empty = np.asarray(bins["count"]) > 0
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
    heading = f"ECE = {100 * bins['ece']:.2f}%"
    axes.set_title(f"{title}\n{heading}" if title else heading)
    axes.legend(loc="upper left")


def reliability_diagram_png(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, title: str = ""
) -> bytes:
    """The reliability diagram of ``probs`` against ``labels`` as PNG bytes."""
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    draw_reliability(figure.add_subplot(1, 1, 1), reliability_bins(probs, labels, n_bins), title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
