"""The model page (card, lineage, jobs with every metric, plots) and the job page."""

from __future__ import annotations

import json
from urllib.parse import urlparse

from gauntlet.scheduler.web import plots
from gauntlet.scheduler.web.data import lineage, model_jobs, submitter
from gauntlet.scheduler.web.html import (
    DASH,
    definition_list,
    esc,
    figure,
    interval,
    link,
    model_href,
    number,
    pct,
    table,
)
from gauntlet.scheduler.web.images import explanations_html


def _safe_url(url) -> str | None:
    """Only http(s) links from a card become links: a ``javascript:`` one would run."""
    text = str(url or "")
    return text if urlparse(text).scheme in ("http", "https") else None


def _percent(value) -> float | None:
    """A card's accuracy: a percentage as RobustBench writes it ("62.80" or 62.8)."""
    try:
        return float(str(value)) / 100
    except (TypeError, ValueError):
        return None


def _measured(entries: list, card: dict):
    """The bare model's leaderboard entry that a card's claims are about (its eps if given)."""
    bare = [e for e in entries if e.defense is None]
    if not bare:
        return None
    eps = card.get("eps")
    try:
        eps = float(eps) if eps is not None else None
    except (TypeError, ValueError):
        eps = None
    if eps is None:
        return bare[0]
    return min(bare, key=lambda e: abs(e.eps - eps))


def card_html(model: dict, entries: list, engine) -> str:
    card = model.get("card") or {}
    items = [("Name", esc(model["name"])), ("Id", f"<code>{esc(model['id'])}</code>")]
    if card.get("name") and card.get("name") != model["name"]:
        items.append(("Card name", esc(card["name"])))
    for key, label in (("authors", "Authors"), ("venue", "Venue")):
        if card.get(key):
            items.append((label, esc(card[key])))
    if card.get("link"):
        url = _safe_url(card["link"])
        paper = f'<a href="{esc(url)}" rel="nofollow">{esc(url)}</a>' if url else esc(card["link"])
        items.append(("Paper", paper))
    items += [
        ("Architecture", esc(model["arch"])),
        ("Dataset", esc(model["dataset"])),
        ("Submitter", esc(submitter(model))),
        ("Submitted", esc(model.get("created_at") or DASH)),
    ]
    origin = lineage(engine, model)
    if origin:
        parent, job = origin["parent"], origin["job"]
        text = link(model_href(parent["id"]), parent["name"]) if parent else DASH
        if job:
            train_link = link(f"/jobs/{job['id']}", "train job")
            text += f" by {esc(job['method'])} ({train_link})"
        items.append(("Derived from", text))
    else:
        items.append(("Training", "submitted weights (not trained by the service)"))
    if model.get("note"):
        items.append(("Note", esc(model["note"])))
    parts = ['<section id="card"><h2>Model card</h2>', definition_list(items)]
    claims = [
        ("Clean accuracy", "clean_acc", "clean_accuracy"),
        ("Robust accuracy (reported)", "reported", "robust_accuracy"),
        ("AutoAttack accuracy", "autoattack_acc", "robust_accuracy"),
    ]
    measured = _measured(entries, card)
    rows = []
    for label, claim_key, measured_key in claims:
        if claim_key in card:
            value = getattr(measured, measured_key) if measured else None
            rows.append([esc(label), pct(_percent(card[claim_key])), pct(value)])
    if rows:
        where = DASH if measured is None else f"{measured.norm} eps={measured.eps:.4g}"
        parts.append(
            table(
                ["", "Claimed", f"Measured ({esc(where)})"],
                rows,
                numeric=(1, 2),
                id="claims",
                caption="claimed by the card beside measured here",
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _metric_text(metric: dict) -> str:
    text = number(metric["value"])
    if metric.get("low") is not None and metric.get("high") is not None:
        text += f" <span class=muted>[{metric['low']:.3g}, {metric['high']:.3g}]</span>"
    return text + f" <span class=muted>n={metric['n']}</span>"


def _source(job: dict) -> str:
    """A transfer job's surrogate: examples are crafted on it, then run on this model."""
    source = job.get("source_model_id")
    if not source:
        return ""
    if source.startswith("ensemble:"):
        return f" (transfer from an ensemble of {esc(source.split(':', 1)[1])})"
    return f" (transfer from {link(model_href(source), source[:12])})"


def jobs_html(jobs: list[dict]) -> str:
    """One row per job; every stored metric in the job's metrics cell."""
    rows = []
    for job in jobs:
        threat = DASH if job.get("norm") is None else f"{job['norm']} {job['eps']:.4g}"
        metrics = "<br>".join(
            f"{esc(name)} = {_metric_text(m)}" for name, m in sorted(job["metrics"].items())
        )
        if len(job["metrics"]) > 12:
            # A corruption job stores a hundred numbers: folded, still without JavaScript.
            metrics = (
                f"<details><summary>{len(job['metrics'])} metrics</summary>{metrics}</details>"
            )
        rows.append(
            [
                link(f"/jobs/{job['id']}", job["id"]),
                esc(job["kind"]),
                esc(job["attack"]) + _source(job),
                esc(threat),
                esc(job.get("defense") or DASH),
                esc(job["status"]),
                metrics or esc(job.get("error") or DASH),
            ]
        )
    headers = ["Job", "Kind", "Attack", "Threat", "Defense", "Status", "Metrics (95% CI, n)"]
    return '<section id="jobs"><h2>Jobs</h2>' + table(headers, rows, id="jobs-table") + "</section>"


def _latest_done(jobs: list[dict], kind: str, test=lambda job: True) -> dict | None:
    done = [j for j in jobs if j["kind"] == kind and j["status"] == "done" and test(j)]
    bare = [j for j in done if not j.get("defense")]
    return (bare or done or [None])[-1]


def plots_html(model: dict, jobs: list[dict], entries: list, transfer, backdoor, pate) -> str:
    calibration = _latest_done(
        jobs, "calibration", lambda j: bool((j.get("details") or {}).get("reliability"))
    )
    corruption = _latest_done(jobs, "corruption")
    ensemble = _latest_done(jobs, "eval", lambda j: bool((j.get("details") or {}).get("breakdown")))
    drawn = [
        (
            plots.robustness_curve(entries, jobs),
            "Robust accuracy (per-example worst case over every attack, 95% interval) against eps",
        ),
        (
            calibration
            and plots.reliability(calibration["details"]["reliability"], model["dataset"]),
            "Accuracy per confidence bin; the diagonal is perfect calibration",
        ),
        (
            corruption and plots.corruption(corruption["metrics"]),
            "Accuracy under each corruption at severities 1 to 5",
        ),
        (
            plots.autoattack_breakdown(ensemble),
            "Points each member broke among those the earlier members left robust",
        ),
        (
            plots.transfer_row_column(model["id"], transfer),
            "Blue: this model's row of the transfer matrix (crafted on it); orange: its column",
        ),
        (plots.backdoor(backdoor), "Before: the backdoored model; after: the defended one"),
        (plots.privacy(pate), "PATE students trained from this model's data"),
    ]
    figures = [figure(svg, caption) for svg, caption in drawn if svg]
    if not figures:
        return '<section id="plots"><h2>Plots</h2><p>No results to plot yet.</p></section>'
    return (
        '<section id="plots"><h2>Plots</h2><div class="plots">'
        + "".join(figures)
        + "</div></section>"
    )


def model_body(engine, model: dict, entries, transfer, backdoor, pate) -> str:
    entries = [e for e in entries if e.model_id == model["id"]]
    jobs = model_jobs(engine, model["id"])
    board = [
        [
            esc(e.dataset),
            esc(f"{e.norm} {e.eps:.4g}"),
            esc(e.defense or DASH),
            pct(e.clean_accuracy),
            pct(e.robust_accuracy),
            interval(e.robust_low, e.robust_high),
            str(e.n),
            esc(e.strongest_attack or DASH),
            str(e.rank),
        ]
        for e in entries
    ]
    headers = [
        "Dataset",
        "Threat",
        "Defense",
        "Clean",
        "Robust",
        "95% CI",
        "n",
        "Strongest",
        "Rank",
    ]
    parts = [card_html(model, entries, engine), '<section id="results"><h2>Leaderboard</h2>']
    parts.append(
        table(headers, board, numeric=(3, 4, 5, 6, 8), id="model-entries")
        if board
        else "<p>No finished attack evaluations yet.</p>"
    )
    parts.append("</section>")
    parts.append(plots_html(model, jobs, entries, transfer, backdoor, pate))
    parts.append(jobs_html(jobs))
    return "".join(parts)


def _duration(seconds) -> str:
    if seconds is None:
        return DASH
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def job_body(detail: dict) -> str:
    items = [
        ("Model", link(model_href(detail["model_id"]), detail.get("model") or detail["model_id"])),
        ("Kind", esc(detail["kind"])),
        ("Attack", esc(detail["attack"]) + _source(detail)),
        ("Status", f'<strong id="job-status">{esc(detail["status"])}</strong>'),
        ("Attempts", esc(detail.get("attempts"))),
        ("Device", esc(detail.get("device") or DASH)),
        ("Created", esc(detail.get("created_at"))),
        ("Started", esc(detail.get("started_at") or DASH)),
        ("Finished", esc(detail.get("finished_at") or DASH)),
        ("Seconds", number(detail.get("seconds"))),
    ]
    if detail.get("error"):
        items.append(("Error", f"<pre>{esc(detail['error'])}</pre>"))
    parts = [definition_list(items)]
    progress = detail.get("progress")
    if progress:
        done, total = progress["done"], progress["total"]
        parts.append(
            f'<section id="progress"><h2>Progress</h2><progress value="{done}" max="{total}">'
            f"{done}/{total}</progress><p>{done} of {total} points; elapsed "
            f"{_duration(progress['elapsed_seconds'])}; about "
            f"{_duration(progress['eta_seconds'])} left</p></section>"
        )
    elif detail["status"] == "running":
        parts.append('<section id="progress"><p>Running; no progress reported yet.</p></section>')
    rows = [
        [esc(m["name"]), number(m["value"]), interval(m["ci_low"], m["ci_high"]), str(m["n"])]
        for m in detail.get("metrics") or []
    ]
    if rows:
        parts.append(
            "<h2>Metrics</h2>"
            + table(["Metric", "Value", "95% CI", "n"], rows, numeric=(1, 2, 3), id="job-metrics")
        )
    parts.append(explanations_html(detail["id"], detail.get("details")))
    spec = json.dumps(detail.get("spec"), indent=2, sort_keys=True, default=str)
    parts.append(f"<h2>Spec</h2><pre id=job-spec>{esc(spec)}</pre>")
    if detail.get("details"):
        text = json.dumps(detail["details"], indent=2, sort_keys=True, default=str)
        parts.append(f"<h2>Details</h2><pre>{esc(text)}</pre>")
    return "".join(parts)
