"""Accounts of the HTTP API and their bearer tokens.

A token is ``<prefix>.<secret>``: the prefix is random, unique and stored as it is, so
a request's token is found by one indexed lookup; the secret is never stored, only the
sha256 of the whole token. The token is shown once, when it is made. Nothing here puts
a token, or any part of one, into an error message or a log line.

``Viewer`` is who asks: an account, or the local operator (the CLI, which sees and
operates everything, as it always has). Anonymous API reads pass ``None``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from gauntlet.cluster.errors import GauntletError
from gauntlet.db.schema import Model, Token, User, utcnow
from gauntlet.scheduler.intake import check_name

_PREFIX_BYTES = 6  # 12 hex digits: collisions are retried, guessing one buys nothing


class AccessError(GauntletError):
    """A refused request; ``status`` is the HTTP status the API answers with."""

    status = 400


# The refusals by status: no token or a bad one, not allowed, not there (or hidden),
# taken by another account, past a quota.
Unauthorized = type("Unauthorized", (AccessError,), {"status": 401})
Forbidden = type("Forbidden", (AccessError,), {"status": 403})
NotFound = type("NotFound", (AccessError,), {"status": 404})
Conflict = type("Conflict", (AccessError,), {"status": 409})
QuotaExceeded = type("QuotaExceeded", (AccessError,), {"status": 429})


@dataclass(frozen=True)
class Viewer:
    id: int | None  # None: the local operator, who has no account
    name: str
    is_admin: bool

    @property
    def is_operator(self) -> bool:
        return self.id is None


#: The local CLI: no account, every model visible, no quota.
OPERATOR = Viewer(None, "operator", True)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user(conn, name: str) -> sa.Row:
    row = conn.execute(sa.select(User.id, User.name).where(User.name == name)).first()
    if row is None:
        raise NotFound(f"there is no user {name!r}: `gauntlet users list` lists them")
    return row


def _issue(conn, user_id: int) -> str:
    """A new token for ``user_id``; only its prefix and hash are written."""
    for _ in range(5):
        prefix = secrets.token_hex(_PREFIX_BYTES)
        taken = conn.scalar(sa.select(Token.id).where(Token.prefix == prefix))
        if taken is None:
            break
    else:  # five collisions of 48 random bits: the generator is broken, not unlucky
        raise GauntletError("could not draw an unused token prefix; try again")
    token = f"{prefix}.{secrets.token_urlsafe(32)}"
    conn.execute(
        sa.insert(Token).values(
            user_id=user_id, prefix=prefix, hash=_digest(token), created_at=utcnow()
        )
    )
    return token


def add_user(engine: sa.Engine, name: str, *, admin: bool = False) -> str:
    """Create an account and return its first token (the only time it is shown)."""
    check_name(name, "user name")
    with engine.begin() as conn:
        if conn.scalar(sa.select(User.id).where(User.name == name)) is not None:
            raise Conflict(f"user {name!r} already exists; `gauntlet users token` issues a token")
        user_id = conn.execute(
            sa.insert(User)
            .values(name=name, is_admin=admin, created_at=utcnow())
            .returning(User.id)
        ).scalar_one()
        return _issue(conn, user_id)


def new_token(engine: sa.Engine, name: str) -> str:
    """Another token for an existing account (the older ones keep working)."""
    with engine.begin() as conn:
        return _issue(conn, _user(conn, name).id)


def remove_user(engine: sa.Engine, name: str) -> int:
    """Delete an account and its tokens; its models stay, owned by nobody.

    Returns how many models it owned. They keep their visibility: a private one is
    then visible to admins only, who can publish it.
    """
    with engine.begin() as conn:
        user = _user(conn, name)
        owned = conn.execute(
            sa.update(Model).where(Model.owner_id == user.id).values(owner_id=None)
        ).rowcount
        conn.execute(sa.delete(Token).where(Token.user_id == user.id))
        conn.execute(sa.delete(User).where(User.id == user.id))
    return owned


def list_users(engine: sa.Engine) -> list[dict]:
    """Every account with its token count, last use and model count (no token text)."""
    tokens = (
        sa.select(
            Token.user_id,
            sa.func.count().label("tokens"),
            sa.func.max(Token.last_used).label("last_used"),
        )
        .group_by(Token.user_id)
        .subquery()
    )
    models = (
        sa.select(Model.owner_id, sa.func.count().label("models"))
        .group_by(Model.owner_id)
        .subquery()
    )
    stmt = (
        sa.select(
            User.id,
            User.name,
            User.is_admin,
            User.created_at,
            sa.func.coalesce(tokens.c.tokens, 0).label("tokens"),
            tokens.c.last_used,
            sa.func.coalesce(models.c.models, 0).label("models"),
        )
        .outerjoin(tokens, tokens.c.user_id == User.id)
        .outerjoin(models, models.c.owner_id == User.id)
        .order_by(User.id)
    )
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(stmt)]
    for row in rows:  # max() over a text column comes back as text on SQLite
        row["last_used"] = _as_time(row["last_used"])
    return rows


def _as_time(value):
    from datetime import datetime, timezone

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value


def authenticate(engine: sa.Engine, token: str) -> Viewer | None:
    """The account a token belongs to, or None for any token that is not a live one."""
    prefix, dot, secret = token.partition(".")
    if not dot or not secret or len(prefix) != 2 * _PREFIX_BYTES:
        return None
    stmt = (
        sa.select(Token.id, Token.hash, User.id.label("user_id"), User.name, User.is_admin)
        .join(User, User.id == Token.user_id)
        .where(Token.prefix == prefix)
    )
    with engine.begin() as conn:
        row = conn.execute(stmt).first()
        # Constant-time comparison: the time taken says nothing about the stored hash.
        if row is None or not hmac.compare_digest(row.hash, _digest(token)):
            return None
        conn.execute(sa.update(Token).where(Token.id == row.id).values(last_used=utcnow()))
    return Viewer(row.user_id, row.name, bool(row.is_admin))
