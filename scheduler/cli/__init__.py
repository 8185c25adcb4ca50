"""The ``gauntlet`` command line: a thin click layer over the service layer.

Core code raises ``GauntletError``; this layer prints its message on one line and
exits with status 1, no traceback. Every option can also come from an environment
variable (``GAUNTLET_<COMMAND>_<OPTION>``), and every listing takes ``--json``.

The commands live in modules by area; importing them here registers them on ``main``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.app import App

console = Console()

# click's "no arguments: show the help" is a usage error in recent versions; it is help,
# not a failure, so it keeps click's own handling.
_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def fail(message: str) -> NoReturn:
    """Print ``Error: message`` as one line on stderr and exit with status 1.

    click.echo, not rich: rich wraps at 80 columns when stderr is not a terminal (and
    would read user text such as a model name as markup), while a one-line error is
    what scripts and logs grep for. Newlines inside the message are folded for the
    same reason.
    """
    click.echo(f"{click.style('Error:', fg='red')} {' '.join(str(message).split())}", err=True)
    sys.exit(1)


class GauntletGroup(click.Group):
    """The root group: every user error, ours or click's, ends as one ``Error:`` line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the root's own options (``gauntlet --bogus``) are parsed here
            return super().make_context(info_name, args, parent=parent, **extra)
        except _HELP:
            raise
        except click.ClickException as exc:
            fail(exc.format_message())

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GauntletError as exc:
            fail(str(exc))
        except _HELP:
            raise
        except click.ClickException as exc:
            # A bad option or argument of a command (``--n lots``, a missing ``--arch``):
            # click would print the usage and exit 2; one line and 1, like our own errors.
            fail(exc.format_message())


def say(text: str) -> None:
    """A line of output that holds user text: escaped, so names print as they are."""
    console.print(escape(text), soft_wrap=True, highlight=False)


def show_table(table) -> None:
    """Print a rich table laid out to fit the terminal (see ``tables.fit``)."""
    from gauntlet.scheduler.cli.tables import fit

    console.print(fit(table, console.width))


def _app(ctx: click.Context) -> App:
    return ctx.ensure_object(App)


class _Local:
    """``service``'s functions with the local ``App`` filled in."""

    def __init__(self, ctx: click.Context):
        self.ctx = ctx

    def __getattr__(self, name: str):
        from gauntlet.scheduler import service

        function = getattr(service, name)
        return lambda *args, **kwargs: function(_app(self.ctx), *args, **kwargs)


def services(ctx: click.Context):
    """The service layer the commands talk to: a ``gauntlet serve`` API when
    ``GAUNTLET_API_URL`` is set (with ``GAUNTLET_TOKEN`` or the ``gauntlet login``
    token), else the local stack."""
    url = os.environ.get("GAUNTLET_API_URL")
    if not url:
        return _Local(ctx)
    from gauntlet.scheduler.remote import RemoteService, load_token

    return RemoteService(url, load_token())


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
            show_table(table)


def _listing(rows: list[dict], as_json: bool, table) -> None:
    """Plain rows as JSON or as one rich table."""
    if as_json:
        _print_json(rows)
    else:
        show_table(table(rows))


@click.group(
    cls=GauntletGroup,
    context_settings={"auto_envvar_prefix": "GAUNTLET", "help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="gauntlet-eval")
def main():
    """gauntlet: robustness evaluation and leaderboard for image classifiers."""


# Registers the commands: these modules import ``main`` from here.
from gauntlet.scheduler.cli import (  # noqa: E402, F401
    accounts,
    boards,
    interop,
    operations,
    operator,
    remote_login,
    submit_jobs,
    verify,
)
