"""Rich tables for the CLI (presentation only; the data comes from the service layer).

Cells, headers, titles and captions carry user text (model names, stored errors,
settings), and rich reads ``[...]`` in a string as markup: a model called ``[/]x``
would raise and one called ``[red]x`` would print red and lose its name. Every string
therefore reaches rich through ``_text`` (rows through ``_row``), which escapes it.
"""

from __future__ import annotations

from itertools import groupby

from rich.markup import escape
from rich.table import Table


def _text(value) -> str:
    return escape(str(value))


def _row(table: Table, cells) -> None:
    table.add_row(*(_text(c) for c in cells))


def _table(title: str, caption: str | None = None) -> Table:
    return Table(title=_text(title), caption=None if caption is None else _text(caption))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def leaderboard_tables(entries) -> list[Table]:
    tables = []
    key = lambda e: (e.dataset, e.norm, e.eps, e.subset_key)  # noqa: E731
    for (dataset, norm, eps, subset), group in groupby(entries, key=key):
        group = list(group)
        attacks = sorted({a for e in group for a in e.attacks})
        defended = any(e.defense for e in group)
        table = _table(
            f"{dataset} · {norm} eps={eps:.4g}",
            f"subset {subset}; worst case over {', '.join(attacks)}",
        )
        columns = ["rank", "model", "clean", "robust", "95% CI", "n", "strongest"]
        if defended:
            columns.insert(4, "non-adaptive")
        columns.append("reliable")
        for column in columns:
            table.add_column(column, justify="right" if column in ("rank", "n") else "left")
        for e in group:
            name = e.model if not e.defense else f"{e.model} + {e.defense}"
            if getattr(e, "rejecting", False):  # may refuse to answer: see the README
                name += " [rejecting]"
            row = [
                str(e.rank),
                name,
                _pct(e.clean_accuracy),
                _pct(e.robust_accuracy)
                + (f" [{e.protocol}]" if getattr(e, "protocol", None) else "")
                + (f" (rejects {_pct(e.rejected_clean)} clean)" if e.rejecting else ""),
                f"{_pct(e.robust_low)}-{_pct(e.robust_high)}",
                str(e.n),
                e.strongest_attack or "-",
            ]
            if defended:
                row.insert(4, _pct(e.robust_non_adaptive))
            reliable = (
                "potentially unreliable: " + "; ".join(e.unreliable) if e.unreliable else "yes"
            )
            # Results of older code (a version bumped since) until nightly re-runs them.
            stale = getattr(e, "stale", None)
            row.append(f"stale ({'; '.join(stale)}); {reliable}" if stale else reliable)
            if getattr(e, "under_evaluation", False):  # follow-ups its flags queued
                row[-1] = f"under evaluation; {row[-1]}"
            _row(table, row)
        tables.append(table)
    return tables


def transfer_tables(cells) -> list[Table]:
    tables = []
    key = lambda c: (c.dataset, c.norm, c.eps)  # noqa: E731
    for (dataset, norm, eps), group in groupby(cells, key=key):
        group = list(group)
        sources = sorted({c.source for c in group})
        targets = sorted({c.target for c in group})
        rate = {(c.source, c.target): c.success_rate for c in group}
        table = _table(
            f"transfer success · {dataset} · {norm} eps={eps:.4g}",
            "row: crafted on; column: evaluated on",
        )
        table.add_column("source \\ target")
        for target in targets:
            table.add_column(_text(target), justify="right")
        for source in sources:
            _row(table, [source, *[_pct(rate.get((source, t))) for t in targets]])
        tables.append(table)
    return tables


def calibration_table(rows) -> Table:
    from gauntlet.scheduler.boards.calibration import COLUMNS

    table = _table("calibration", "ECE: 15 equal-width bins; adv_: under attack")
    for column in ("model", "dataset", "n", *COLUMNS):
        table.add_column(column, justify="left" if column in ("model", "dataset") else "right")
    for r in rows:
        values = [r.metrics.get(c) for c in COLUMNS]
        cells = ["-" if v is None else f"{v:.3f}" for v in values]
        _row(table, [_entry_name(r), r.dataset, r.n, *cells])
    return table


def corruption_table(rows) -> Table:
    """Corruptions down, models across: nine corruptions do not fit as columns."""
    names = sorted(
        {k[4:] for r in rows for k in r.metrics if k.startswith("acc@") and k.count("@") == 1}
    )
    table = _table("corruptions", "accuracy (ECE), mean over five severities")
    table.add_column("corruption")
    for r in rows:
        table.add_column(_text(f"{_entry_name(r)} ({r.dataset}, n={r.n})"), justify="right")
    lines = [
        ("clean", "clean_accuracy", None),
        ("mean", "mean_corruption_accuracy", "mean_corruption_ece"),
    ]
    lines += [(n, f"acc@{n}", f"ece@{n}") for n in names]
    for label, acc, ece in lines:
        cells = []
        for r in rows:
            a, e = r.metrics.get(acc), r.metrics.get(ece) if ece else None
            cells.append(_pct(a) + ("" if e is None else f" ({e:.3f})"))
        _row(table, [label, *cells])
    return table


def _track_table(title: str, caption: str, left: tuple, right: tuple, rows, cells) -> Table:
    """A track table: settings columns, right-aligned number columns, a row per run.

    Every row starts with the model and dataset; ``cells(row)`` gives the rest.
    """
    table = _table(title, caption)
    for column in left:
        table.add_column(column)
    for column in right:
        table.add_column(column, justify="right")
    for r in rows:
        _row(table, [r.model, r.dataset, *cells(r)])
    return table


_BACKDOOR_METRICS = (
    "backdoored_clean_accuracy",
    "backdoored_attack_success_rate",
    "clean_accuracy",
    "attack_success_rate",
)


def backdoor_table(rows) -> Table:
    """Trigger and poison rate x defense: clean accuracy and ASR before and after."""

    def cells(r) -> list[str]:
        s = r.settings
        trigger = f"{s.get('trigger', '?')} ({s.get('mode', 'all-to-one')})"
        head = [trigger, _pct(s.get("poison_rate")), _defense_label(r), str(r.n)]
        return head + [_pct(r.metrics.get(k)) for k in _BACKDOOR_METRICS]

    return _track_table(
        "backdoors",
        "ASR on triggered test images whose label is not the target; "
        "before: the backdoored model, after: the defended one",
        ("model", "dataset", "trigger", "poison", "defense", "n"),
        ("clean before", "ASR before", "clean after", "ASR after"),
        rows,
        cells,
    )


def _defense_label(row) -> str:
    s = row.settings
    if row.method == "transfer":
        detail = f"{s.get('task')}, {'frozen' if s.get('freeze') else 'full'}"
        if s.get("amplify", 1) != 1:
            detail += f", x{s.get('amplify'):g}"
        return f"transfer ({detail})"
    if row.method == "distillation":
        triggered = s.get("triggered_fraction", 0)
        return f"distillation (T={s.get('temperature'):g}" + (
            f", {_pct(triggered)} triggered)" if triggered else ")"
        )
    if row.method == "finetune":
        return f"fine-tune ({_pct(s.get('fraction'))} clean)"
    return row.method


def privacy_table(rows) -> Table:
    """PATE runs: the privacy spent, what the student learned, and the backdoor's fate."""

    def cells(r) -> list[str]:
        s, m = r.settings, r.metrics
        eps = "no noise" if "eps" not in m else f"{m['eps']:.3f} ({m['eps_data_independent']:.3f})"
        teachers = [str(s.get("teachers", "?")), str(s.get("backdoored_teachers", 0))]
        delta = "-" if "delta" not in m else f"{m['delta']:g}"
        student = [_pct(m.get("student_accuracy")), _pct(m.get("student_attack_success_rate"))]
        return [r.method, *teachers, _pct(m.get("answered")), eps, delta, *student]

    return _track_table(
        "privacy (PATE)",
        "eps: data-dependent (data-independent bound in brackets); "
        "ASR: student on triggered test images",
        ("model", "dataset", "aggregator", "teachers", "backdoored", "answered"),
        ("eps", "delta", "student acc", "student ASR"),
        rows,
        cells,
    )


def subtasks_table(rows: list[dict]) -> Table:
    table = _table(f"{len(rows)} sub-tasks")
    for column in ("name", "node", "pid", "gpus", "started", "seconds"):
        table.add_column(column)
    for r in rows:
        seconds = (r["finished_at"] - r["started_at"]).total_seconds()
        _row(
            table,
            [
                r["name"],
                (r["node_id"] or "local")[:12],
                str(r["worker_pid"]),
                ",".join(r["gpu_ids"] or []) or "-",
                r["started_at"].strftime("%H:%M:%S.%f")[:-3],
                f"{seconds:.1f}",
            ],
        )
    return table


def _entry_name(row) -> str:
    return row.model if not row.defense else f"{row.model} + {row.defense}"


def jobs_table(rows: list[dict]) -> Table:
    table = _table(f"{len(rows)} jobs")
    for column in (
        "id",
        "model",
        "dataset",
        "attack",
        "threat",
        "status",
        "attempts",
        "device",
        "error",
    ):
        table.add_column(column)
    for r in rows:
        threat = "-" if r.get("norm") is None else f"{r['norm']} {r['eps']:.4g}"
        status = str(getattr(r["status"], "value", r["status"]))
        _row(
            table,
            [
                str(r["id"]),
                str(r.get("model") or r.get("model_id", ""))[:24],
                r["dataset"],
                r["attack"],
                threat,
                status,
                str(r.get("attempts", 0)),
                r.get("device") or "-",
                (r.get("error") or "")[:80],
            ],
        )
    return table


def registry_rows(what: str, app=None) -> list[dict]:
    if what == "attacks":
        from gauntlet.workers.attacks import ATTACKS

        return [{"name": name, "config": repr(cls())} for name, cls in sorted(ATTACKS.items())]
    if what == "archs":
        from gauntlet.workers.architectures import architecture_names

        return [{"name": name} for name in architecture_names()]
    if what == "datasets":
        from gauntlet.workers.datasets import dataset_info, dataset_names

        rows = []
        for name in dataset_names():
            info = dataset_info(name)
            rows.append(
                {
                    "name": name,
                    "shape": [info.channels, info.height, info.width],
                    "classes": info.num_classes,
                    "test_size": info.test_size,
                }
            )
        return rows
    if what == "suites":
        from gauntlet.scheduler.suites import load_suite, suite_names

        return [
            {"name": n, "description": " ".join(load_suite(n).description.split())}
            for n in suite_names()
        ]
    from gauntlet.scheduler import service

    return service.list_models(app)


def rows_table(title: str, rows: list[dict]) -> Table:
    table = _table(title)
    columns = list(rows[0]) if rows else ["name"]
    for column in columns:
        table.add_column(_text(column))
    for row in rows:
        _row(table, [row.get(c, "") for c in columns])
    return table


def fit(table: Table, width: int) -> Table:
    """``table`` if it fits ``width`` columns, else the same cells laid out vertically.

    rich squeezes a table wider than the terminal by cutting cells to "…", which loses
    the very numbers the table is for. A table whose narrowest rendering (every cell's
    longest word on one line) does not fit is shown as one block per row instead: the
    column names down the left, that row's values beside them.
    """
    if _narrowest(table) <= width:
        return table
    vertical = Table(title=table.title, caption=table.caption, show_header=False)
    vertical.add_column(overflow="fold", style="bold")
    vertical.add_column(overflow="fold")
    cells = [list(column.cells) for column in table.columns]
    rows = len(cells[0]) if cells else 0
    for i in range(rows):
        for j, column in enumerate(table.columns):
            # Headers and cells were escaped when the table was built.
            vertical.add_row(column.header, cells[j][i], end_section=j == len(cells) - 1)
    return vertical


def _narrowest(table: Table) -> int:
    """The table's width with every column as narrow as its longest word.

    Counted here rather than asked of rich: rich's own minimum assumes it may cut words
    to "…", the very thing to avoid.
    """
    from rich.text import Text

    total = 1  # the left border
    for column in table.columns:
        texts = [column.header, *column.cells]
        words = [len(word) for cell in texts for word in Text.from_markup(str(cell)).plain.split()]
        total += max(words, default=1) + 2 + 1  # padding either side, then a border
    return total
