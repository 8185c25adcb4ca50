"""``gauntlet login``: keep an API token for the remote CLI."""

from __future__ import annotations

import os

import click

from gauntlet.cluster.errors import GauntletError
from gauntlet.scheduler.cli import main, say


@main.command()
@click.option("--token", help="The token `gauntlet users add` printed (asked for if not given).")
@click.pass_context
def login(ctx, token):
    """Check a token against GAUNTLET_API_URL and keep it in a file only you can read."""
    from gauntlet.scheduler.remote import RemoteService, save_token

    url = os.environ.get("GAUNTLET_API_URL")
    if not url:
        raise GauntletError("Set GAUNTLET_API_URL to the API's address first")
    if not token:
        token = click.prompt("Token", hide_input=True)
    me = RemoteService(url, token).whoami()
    path = save_token(token)
    say(f"logged in to {url} as {me['name']}; the token is in {path} (mode 600)")
