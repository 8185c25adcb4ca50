"""The board pages: the leaderboard (sortable by links) and the five per-kind boards.

Each page takes the service layer's rows and the models the viewer may see, drops
the rest, and builds HTML; sorting is a query string (``?sort=robust&order=asc``),
so it needs no JavaScript.
"""

from __future__ import annotations

import re
from itertools import groupby

from gauntlet.scheduler.web import html, plots
from gauntlet.scheduler.web.data import submitter
from gauntlet.scheduler.web.html import esc, link, pct, table


class BadRequest(ValueError):
    """A query parameter the page cannot use: the route answers 400 with the message."""


# column -> (header, sort key, numeric?); every column sorts.
COLUMNS = {
    "rank": ("Rank", lambda e, m: e.rank, True),
    "model": ("Model", lambda e, m: (e.model.lower(), e.defense or ""), False),
    "clean": ("Clean (95% CI)", lambda e, m: e.clean_accuracy, True),
    "robust": ("Robust (95% CI)", lambda e, m: e.robust_accuracy, True),
    "n": ("n", lambda e, m: e.n, True),
    "strongest": ("Strongest attack", lambda e, m: e.strongest_attack or "", False),
    "reliable": ("Reliable", lambda e, m: (bool(e.unreliable), e.unreliable), False),
    "arch": ("Architecture", lambda e, m: e.arch, False),
    "submitter": ("Submitter", lambda e, m: submitter(m.get(e.model_id)), False),
}


def sort_params(sort: str | None, order: str | None) -> tuple[str, str]:
    sort = sort or "rank"
    if sort not in COLUMNS:
        raise BadRequest(f"cannot sort by {sort!r}; columns: {', '.join(COLUMNS)}")
    order = order or ("desc" if sort in ("clean", "robust") else "asc")
    if order not in ("asc", "desc"):
        raise BadRequest(f"order must be 'asc' or 'desc', not {order!r}")
    return sort, order


def slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(str(p) for p in parts)).strip("-")


def _clean_interval(e) -> str:
    from gauntlet.workers.results import wilson_interval

    low, high = wilson_interval(round(e.clean_accuracy * e.n), e.n) if e.n else (None, None)
    return html.interval(low, high)


def _entry_cells(e, models: dict) -> list[str]:
    name = link(html.model_href(e.model_id), e.model)
    if e.defense:
        name += f" + {esc(e.defense)}"
    rejects = getattr(e, "rejecting", False)  # may refuse to answer: see the README
    if rejects:
        name += ' <span class="flag">rejecting defense</span>'
    if e.unreliable:
        reliable = '<span class="flag">potentially unreliable: ' + esc("; ".join(e.unreliable))
        reliable += "</span>"
    else:
        reliable = '<span class="ok">yes</span>'
    if getattr(e, "stale", None):  # older code's results, until nightly re-runs them
        reliable = f'<span class="flag">stale: {esc("; ".join(e.stale))}</span> ' + reliable
    if getattr(e, "under_evaluation", False):  # follow-ups its flags queued still run
        reliable = '<span class="flag">under evaluation</span> ' + reliable
    return [
        str(e.rank),
        name,
        f"{pct(e.clean_accuracy)} <span class=muted>({_clean_interval(e)})</span>",
        f"{pct(e.robust_accuracy)} <span class=muted>"
        f"({html.interval(e.robust_low, e.robust_high)})</span>"
        + (f" <span class=muted>[{esc(e.protocol)}]</span>" if e.protocol else "")
        + (f" <span class=muted>rejects {pct(e.rejected_clean)} clean</span>" if rejects else ""),
        str(e.n),
        esc(e.strongest_attack or html.DASH),
        reliable,
        esc(e.arch),
        esc(submitter(models.get(e.model_id))),
    ]


def leaderboard_html(entries, models: dict, sort: str, order: str, path: str) -> str:
    """One table per dataset and threat model, of the entries whose model is visible."""
    entries = [e for e in entries if e.model_id in models]
    if not entries:
        return "<p>No finished evaluations yet.</p>"
    parts = []
    key = lambda e: (e.dataset, e.norm, e.eps, e.subset_key)  # noqa: E731
    for (dataset, norm, eps, subset), group in groupby(entries, key=key):
        group = list(group)
        # Ranked among the visible entries: a hidden model leaves no gap in the ranks.
        for rank, e in enumerate(sorted(group, key=lambda e: e.rank), start=1):
            e.rank = rank
        sort_key = COLUMNS[sort][1]
        group.sort(key=lambda e: (sort_key(e, models), e.rank), reverse=order == "desc")
        headers = []
        for column, (title, _, _) in COLUMNS.items():
            flip = "asc" if (column == sort and order == "desc") else "desc"
            if column != sort:
                flip = "desc" if column in ("clean", "robust") else "asc"
            arrow = "" if column != sort else (" \u25b2" if order == "asc" else " \u25bc")
            headers.append(link(path + html.query(sort=column, order=flip), title + arrow))
        attacks = sorted({a for e in group for a in e.attacks})
        caption = f"subset {subset}; worst case per example over {', '.join(attacks)}"
        parts.append(
            f'<h2><a href="/leaderboard/{esc(dataset)}/{esc(norm)}">{esc(dataset)}</a> '
            f"\u00b7 {esc(norm)} eps={eps:.4g}</h2>"
        )
        parts.append(
            table(
                headers,
                [_entry_cells(e, models) for e in group],
                numeric=(0, 4),
                id=slug("board", dataset, norm, f"{eps:.4g}", subset),
                aria_label=f"{dataset} {norm} eps={eps:.4g}",
                caption=caption,
                **{"class": "leaderboard"},
            )
        )
    return "".join(parts)


def _name(row) -> str:
    text = link(html.model_href(row.model_id), row.model)
    return text + (f" + {esc(row.defense)}" if getattr(row, "defense", None) else "")


def calibration_html(rows, models: dict) -> str:
    from gauntlet.scheduler.boards.calibration import COLUMNS as METRICS

    rows = [r for r in rows if r.model_id in models]
    if not rows:
        return "<p>No calibration results yet.</p>"
    headers = ["Model", "Dataset", "n", *[esc(c) for c in METRICS]]
    cells = [
        [_name(r), esc(r.dataset), str(r.n), *[html.number(r.metrics.get(c)) for c in METRICS]]
        for r in rows
    ]
    numeric = tuple(range(2, len(headers)))
    caption = "ECE: 15 equal-width bins; adv_: under attack; after_ts: after temperature scaling"
    return table(headers, cells, numeric=numeric, id="calibration", caption=caption)


def corruption_html(rows, models: dict) -> str:
    rows = [r for r in rows if r.model_id in models]
    if not rows:
        return "<p>No corruption results yet.</p>"
    names = sorted(
        {k[4:] for r in rows for k in r.metrics if k.startswith("acc@") and k.count("@") == 1}
    )
    headers = ["Model", "Dataset", "n", "clean", "mean", *[esc(n) for n in names]]
    cells = []
    for r in rows:
        m = r.metrics
        line = [_name(r), esc(r.dataset), str(r.n), pct(m.get("clean_accuracy"))]
        line.append(pct(m.get("mean_corruption_accuracy")))
        line += [pct(m.get(f"acc@{n}")) for n in names]
        cells.append(line)
    caption = "accuracy, mean over five severities"
    return table(
        headers, cells, numeric=tuple(range(2, len(headers))), id="corruption", caption=caption
    )


def transfer_html(cells, models: dict) -> str:
    cells = [c for c in cells if c.source_id in models and c.target_id in models]
    if not cells:
        return "<p>No transfer results yet.</p>"
    parts = []
    key = lambda c: (c.dataset, c.norm, c.eps)  # noqa: E731
    for (dataset, norm, eps), group in groupby(cells, key=key):
        group = list(group)
        title = f"Transfer success, {dataset} {norm} eps={eps:.4g}"
        parts.append(f"<h2>{esc(title)}</h2>")
        svg = plots.transfer_heatmap(group, slug("heatmap", dataset, norm, f"{eps:.4g}"), title)
        parts.append(html.figure(svg, "row: crafted on; column: evaluated on; percent fooled"))
        rows = [
            [
                link(html.model_href(c.source_id), c.source),
                link(html.model_href(c.target_id), c.target),
                pct(c.success_rate),
                html.interval(c.low, c.high),
                str(c.n),
            ]
            for c in group
        ]
        headers = ["Source (crafted on)", "Target", "Success", "95% CI", "n"]
        parts.append(
            table(
                headers, rows, numeric=(2, 3, 4), id=slug("transfer", dataset, norm, f"{eps:.4g}")
            )
        )
    return "".join(parts)


BACKDOOR_METRICS = (
    ("backdoored_clean_accuracy", "clean before"),
    ("backdoored_attack_success_rate", "ASR before"),
    ("clean_accuracy", "clean after"),
    ("attack_success_rate", "ASR after"),
)


def backdoor_html(rows, models: dict) -> str:
    rows = [r for r in rows if r.model_id in models]
    if not rows:
        return "<p>No backdoor results yet.</p>"
    headers = ["Model", "Dataset", "Trigger", "Poison", "Defense", "n"]
    headers += [label for _, label in BACKDOOR_METRICS]
    cells = []
    for r in rows:
        s = r.settings
        trigger = f"{s.get('trigger', '?')} ({s.get('mode', 'all-to-one')})"
        line = [_name(r), esc(r.dataset), esc(trigger), pct(s.get("poison_rate")), esc(r.method)]
        line += [str(r.n), *[pct(r.metrics.get(k)) for k, _ in BACKDOOR_METRICS]]
        cells.append(line)
    caption = "ASR on triggered test images whose label is not the target"
    return table(
        headers, cells, numeric=tuple(range(5, len(headers))), id="backdoor", caption=caption
    )


def privacy_html(rows, models: dict) -> str:
    rows = [r for r in rows if r.model_id in models]
    if not rows:
        return "<p>No privacy results yet.</p>"
    headers = [
        "Model",
        "Dataset",
        "Aggregator",
        "Teachers",
        "Backdoored",
        "Answered",
        "eps",
        "delta",
        "Student acc",
        "Student ASR",
    ]
    cells = []
    for r in rows:
        s, m = r.settings, r.metrics
        eps = "no noise" if "eps" not in m else f"{m['eps']:.3f}"
        cells.append(
            [
                _name(r),
                esc(r.dataset),
                esc(r.method),
                esc(s.get("teachers", "?")),
                esc(s.get("backdoored_teachers", 0)),
                pct(m.get("answered")),
                eps,
                html.number(m.get("delta")),
                pct(m.get("student_accuracy")),
                pct(m.get("student_attack_success_rate")),
            ]
        )
    caption = "eps: data-dependent privacy spent; ASR: student on triggered test images"
    return table(
        headers, cells, numeric=tuple(range(3, len(headers))), id="privacy", caption=caption
    )
