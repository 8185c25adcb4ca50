"""The pages' plots: matplotlib figures rendered as inline SVG.

Object API on the Agg canvas (no pyplot): no display is needed and no figure state is
shared between the server's threads. Each function returns None when it has no data,
so a page draws only the plots it can fill. Text stays text in the SVG (not paths),
which keeps pages small and the labels readable by a screen reader and a test.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gauntlet.scheduler.web.html import esc
from gauntlet.workers.calibration.diagram import draw_reliability

_RC = {"svg.fonttype": "none", "font.size": 9}


def _figure(width: float = 5.2, height: float = 3.6) -> Figure:
    # Constrained layout keeps long tick labels and colorbars inside the figure.
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def to_svg(figure: Figure, plot_id: str, label: str) -> str:
    """The figure as an ``<svg>`` element with an id, a role and an aria-label."""
    buffer = io.StringIO()
    with matplotlib.rc_context(_RC):
        figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and doctype: inline, not a file
    attributes = f'<svg id="{esc(plot_id)}" role="img" aria-label="{esc(label)}" '
    return re.sub(r"^<svg ", attributes, text, count=1)


def robustness_curve(entries: list, jobs: list[dict]) -> str | None:
    """Robust accuracy against eps: the leaderboard's worst case per norm, and each
    eps_sweep curve an eval job stored."""
    series: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for e in entries:
        if e.defense is None:
            series[f"worst case ({e.norm})"].append(
                (e.eps, e.robust_accuracy, e.robust_low, e.robust_high)
            )
    for job in jobs:
        curve = (job.get("details") or {}).get("curve")
        if job["status"] == "done" and curve and curve.get("eps"):
            name = f"{job['attack']} sweep ({job['norm']})"
            own = (job.get("metrics") or {}).get("robust_accuracy")
            if own and job.get("eps") is not None:  # the job's own budget is on the curve too
                series[name].append((job["eps"], own["value"], own["value"], own["value"]))
            series[name] += [
                (x, y, y, y) for x, y in zip(curve["eps"], curve["robust_accuracy"], strict=False)
            ]
    if not series:
        return None
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    for name, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        ys = [100 * p[1] for p in points]
        low = [100 * (p[1] - p[2]) for p in points]
        high = [100 * (p[3] - p[1]) for p in points]
        axes.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name)
    axes.set_title("Robust accuracy against the perturbation budget")
    axes.set_xlabel("eps (input scale 0-1)")
    axes.set_ylabel("Robust accuracy (%)")
    axes.set_ylim(0, 100)
    # From eps 0 (where robust accuracy is clean accuracy): one budget still reads as a
    # point on a curve instead of filling the axis.
    axes.set_xlim(0, 1.1 * max(p[0] for points in series.values() for p in points))
    axes.legend(loc="best")
    return to_svg(figure, "plot-robustness", "Robust accuracy against eps")


def reliability(bins: dict | None, title: str) -> str | None:
    if not bins:
        return None
    figure = _figure(4.4, 4.4)
    draw_reliability(figure.add_subplot(1, 1, 1), bins, f"Reliability diagram: {title}")
    return to_svg(figure, "plot-reliability", "Reliability diagram")


def corruption(metrics: dict) -> str | None:
    """Accuracy per corruption against severity, with clean accuracy for reference."""
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for name, m in metrics.items():
        parts = name.split("@")
        if parts[0] == "acc" and len(parts) == 3 and parts[2].isdigit():
            lines[parts[1]].append((int(parts[2]), 100 * m["value"]))
    if not lines:
        return None
    figure = _figure(6.4, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    for name, points in sorted(lines.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    if "clean_accuracy" in metrics:
        clean = 100 * metrics["clean_accuracy"]["value"]
        axes.axhline(clean, color="black", linestyle="--", label="clean")
    axes.set_title("Accuracy per corruption and severity")
    axes.set_xlabel("Severity (1-5)")
    axes.set_ylabel("Accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_xticks(range(1, 6))
    figure.legend(loc="outside right center", fontsize=7)
    return to_svg(figure, "plot-corruption", "Accuracy per corruption and severity")


def autoattack_breakdown(job: dict | None) -> str | None:
    """Points each ensemble member broke (each runs only on points still robust)."""
    breakdown = ((job or {}).get("details") or {}).get("breakdown")
    if not breakdown:
        return None
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    names = list(breakdown)
    axes.bar(names, [breakdown[n] for n in names], color="tab:purple")
    axes.set_title(f"{job['attack']} per member ({job['norm']}, eps {job['eps']:.4g})")
    axes.set_xlabel("Member attack (in run order)")
    axes.set_ylabel("Points broken")
    return to_svg(figure, "plot-autoattack", "AutoAttack per-member breakdown")


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def transfer_row_column(model_id: str, cells: list) -> str | None:
    """Per other model and threat: success of examples crafted on this model against it
    (this model's row of the matrix) and of examples crafted on it against this model
    (its column)."""
    pairs: dict[tuple, dict[str, float]] = defaultdict(dict)
    for c in cells:
        if c.source_id == model_id:
            pairs[(c.target, c.norm, c.eps)]["row"] = 100 * c.success_rate
        elif c.target_id == model_id:
            pairs[(c.source, c.norm, c.eps)]["column"] = 100 * c.success_rate
    if not pairs:
        return None
    keys = sorted(pairs)
    figure = _figure(6.4, 1.8 + 0.55 * len(keys))
    axes = figure.add_subplot(1, 1, 1)
    height = 0.38
    for offset, part, label in (
        (0, "row", "crafted here, run there"),
        (height, "column", "crafted there, run here"),
    ):
        values = [pairs[k].get(part, 0.0) for k in keys]
        axes.barh([i + offset for i in range(len(keys))], values, height=height, label=label)
    axes.set_yticks(
        [i + height / 2 for i in range(len(keys))],
        [f"{_short(name)} ({norm} {eps:.3g})" for name, norm, eps in keys],
    )
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_title("Transfer to and from this model")
    axes.set_xlabel("Transfer success (% of points fooled)")
    axes.set_ylabel("Other model (threat)")
    axes.legend(loc="lower right", fontsize=7)
    return to_svg(figure, "plot-transfer", "Transfer matrix row and column of this model")


def transfer_heatmap(cells: list, plot_id: str, title: str) -> str | None:
    if not cells:
        return None
    sources = sorted({c.source for c in cells})
    targets = sorted({c.target for c in cells})
    grid = [[float("nan")] * len(targets) for _ in sources]
    for c in cells:
        grid[sources.index(c.source)][targets.index(c.target)] = 100 * c.success_rate
    figure = _figure(max(4.5, 2.5 + 0.7 * len(targets)), max(3.0, 1.8 + 0.5 * len(sources)))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
    axes.set_yticks(range(len(sources)), sources)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value == value:  # not NaN: the pair was evaluated
                axes.text(j, i, f"{value:.0f}", ha="center", va="center", color="white")
    axes.set_xlabel("Target (evaluated on)")
    axes.set_ylabel("Source (crafted on)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="Transfer success (%)")
    return to_svg(figure, plot_id, title)


def _grouped_bars(rows: list, series: list[tuple[str, str]], labels, plot_id, title, ylabel):
    if not rows:
        return None
    figure = _figure(5.6, 3.8)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for k, (metric, name) in enumerate(series):
        values = [100 * (r.metrics.get(metric) or 0.0) for r in rows]
        axes.bar([i + k * width for i in range(len(rows))], values, width=width, label=name)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
    axes.set_title(title)
    axes.set_xlabel("Configuration")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 100)
    axes.legend(loc="best", fontsize=7)
    return to_svg(figure, plot_id, title)


def backdoor(rows: list) -> str | None:
    series = [
        ("backdoored_attack_success_rate", "ASR before"),
        ("attack_success_rate", "ASR after"),
        ("backdoored_clean_accuracy", "clean before"),
        ("clean_accuracy", "clean after"),
    ]
    labels = [f"{r.method} #{r.job_id}" for r in rows]
    title = "Backdoor: attack success and clean accuracy, before and after the defense"
    return _grouped_bars(rows, series, labels, "plot-backdoor", title, "Rate (%)")


def privacy(rows: list) -> str | None:
    series = [
        ("student_accuracy", "student accuracy"),
        ("student_attack_success_rate", "student ASR"),
    ]
    labels = []
    for r in rows:
        eps = r.metrics.get("eps")
        labels.append(f"{r.method} #{r.job_id}" + ("" if eps is None else f"\neps {eps:.2f}"))
    title = "PATE: student accuracy and backdoor success per run"
    return _grouped_bars(rows, series, labels, "plot-privacy", title, "Rate (%)")
