"""Commands that read a board: leaderboard, calibration, corruption, transfer, backdoors,
privacy, and the registry listings (``gauntlet list``)."""

from __future__ import annotations

import click

from gauntlet.scheduler.cli import _app, _listing, _show, main, services, tables


def _board(name: str, what: str, render, doc: str) -> None:
    """A ``gauntlet NAME [--dataset D] [--json]`` command showing ``service.NAME``'s rows.

    ``what`` names the evaluations in the line printed when there are none yet;
    ``render`` turns the rows into rich tables.
    """

    @main.command(name, help=doc)
    @click.option("--dataset")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def command(ctx, dataset, as_json):
        rows = getattr(services(ctx), name)(dataset=dataset)
        _show(rows, as_json, what, render)


def _one(table):
    return lambda rows: [table(rows)]


# (command, what its empty line calls the evaluations, tables, help)
_BOARDS = [
    (
        "leaderboard",
        "robustness",
        tables.leaderboard_tables,
        "Rank models by robust accuracy (per-example worst case across attacks).",
    ),
    (
        "calibration",
        "calibration",
        _one(tables.calibration_table),
        "Calibration table: ECE before and after temperature scaling, NLL, Brier, under attack.",
    ),
    (
        "corruption",
        "corruption",
        _one(tables.corruption_table),
        "Corruption table: accuracy and ECE under common corruptions at five severities.",
    ),
    (
        "transfer",
        "transfer",
        tables.transfer_tables,
        "Transferability matrix: success of examples crafted on row model against column.",
    ),
    (
        "backdoors",
        "backdoor",
        _one(tables.backdoor_table),
        "Backdoor table: trigger and poison rate x defense -> clean accuracy and ASR.",
    ),
    (
        "privacy",
        "PATE",
        _one(tables.privacy_table),
        "Privacy table (PATE): eps, delta, student accuracy and the student's ASR.",
    ),
]
for _name, _what, _render, _doc in _BOARDS:
    _board(_name, _what, _render, _doc)


@main.command("list")
@click.argument("what", type=click.Choice(["attacks", "archs", "datasets", "suites", "models"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_cmd(ctx, what, as_json):
    """List registered attacks, architectures, datasets, suites or submitted models."""
    rows = tables.registry_rows(what, _app(ctx) if what == "models" else None)
    _listing(rows, as_json, lambda r: tables.rows_table(what, r))
