"""Commands of the HTTP API's operator: serve, users and publish."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from gauntlet.scheduler.cli import _app, _listing, _print_json, console, main, say


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.pass_context
def serve(ctx, host, port):
    """Run the HTTP API (and the web pages) over this service's database and queue."""
    import uvicorn

    from gauntlet.scheduler.api import create_api

    app = _app(ctx)
    app.settings.ensure_home()
    # The access log records method, path and status; tokens travel in a header only,
    # which it never prints.
    uvicorn.run(create_api(app), host=host, port=port, log_level="info")


@main.group()
def users():
    """Accounts of the HTTP API and their tokens."""


@users.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="May see and operate every model.")
@click.pass_context
def users_add(ctx, name, admin):
    """Create an account and print its token (shown this once: keep it)."""
    from gauntlet.scheduler import service

    token = service.add_user(_app(ctx), name, admin=admin)
    say(f"user {name} created{' (admin)' if admin else ''}; its token, shown only now:")
    click.echo(token)


@users.command("token")
@click.argument("name")
@click.pass_context
def users_token(ctx, name):
    """Issue another token for an account (its other tokens keep working)."""
    from gauntlet.scheduler import service

    click.echo(service.new_token(_app(ctx), name))


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def users_list(ctx, as_json):
    """Every account: admin or not, tokens, last use and models owned."""
    from gauntlet.scheduler import service

    rows = service.list_users(_app(ctx))
    if rows or as_json:
        _listing(rows, as_json, _users_table)
    else:
        console.print("No users yet: `gauntlet users add NAME` creates one.")


@users.command("remove")
@click.argument("name")
@click.pass_context
def users_remove(ctx, name):
    """Delete an account and its tokens; its models stay, owned by nobody."""
    from gauntlet.scheduler import service

    owned = service.remove_user(_app(ctx), name)
    say(f"user {name} removed; {owned} models it owned now have no owner")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def publish(ctx, model, as_json):
    """Make MODEL (a name or id prefix) visible to everyone on the API and its boards."""
    from gauntlet.scheduler import service

    published = service.publish_model(_app(ctx), model)
    if as_json:
        _print_json(published)
    else:
        say(f"{published['name']} ({published['id'][:12]}) is public")


def _users_table(rows: list[dict]) -> Table:
    table = Table(title="users")
    for header in ("name", "admin", "tokens", "last used", "models", "created"):
        table.add_column(header)
    for r in rows:
        last = r["last_used"].strftime("%Y-%m-%d %H:%M") if r["last_used"] else "never"
        cells = (
            r["name"],
            "yes" if r["is_admin"] else "",
            r["tokens"],
            last,
            r["models"],
            r["created_at"].strftime("%Y-%m-%d"),
        )
        table.add_row(*(escape(str(c)) for c in cells))
    return table
