"""The ``gauntlet`` command line: a thin click layer over the service layer.

Core code raises ``GauntletError``; this layer prints its message on one line and
exits with status 1, no traceback. Every option can also come from an environment
variable (``GAUNTLET_<COMMAND>_<OPTION>``), and every listing takes ``--json``.

The commands live in modules by area; importing them here registers them on ``main``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click
from rich.console import Console

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.app import App

console = Console()
err_console = Console(stderr=True)


class GauntletGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GauntletError as exc:
            err_console.print(f"[red]Error:[/red] {exc}", highlight=False, markup=True)
            sys.exit(1)


def _app(ctx: click.Context) -> App:
    return ctx.ensure_object(App)


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _show(rows: list, as_json: bool, what: str, tables) -> None:
    """A listing as JSON, a line saying there is nothing yet, or rich tables."""
    if as_json:
        _print_json([asdict(r) for r in rows])
    elif not rows:
        console.print(f"No finished {what} evaluations yet.")
    else:
        for table in tables(rows):
            console.print(table)


def _listing(rows: list[dict], as_json: bool, table) -> None:
    """Plain rows as JSON or as one rich table."""
    if as_json:
        _print_json(rows)
    else:
        console.print(table(rows))


@click.group(
    cls=GauntletGroup,
    context_settings={"auto_envvar_prefix": "GAUNTLET", "help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="gauntlet-eval")
def main():
    """gauntlet: robustness evaluation and leaderboard for image classifiers."""


# Registers the commands: these modules import ``main`` from here.
from gauntlet.scheduler.cli import boards, operations, submit_jobs  # noqa: E402, F401
