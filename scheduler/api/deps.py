"""What a route needs: the process's ``App`` and who is asking.

The token is read from the ``Authorization`` header only (never a query string, which
access logs record). A missing header is an anonymous reader; a header that is there
but malformed, or a token that is not a live one, is refused with 401, on reads too,
so a typo in a token is not silently a narrower view.
"""

from __future__ import annotations

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from gauntlet.scheduler import service
from gauntlet.scheduler.accounts import Unauthorized, Viewer
from gauntlet.scheduler.app import App

# Declared for the OpenAPI document; the header itself is parsed below.
_bearer = HTTPBearer(auto_error=False, description="A token from `gauntlet users add`.")

_HOW = "send `Authorization: Bearer TOKEN` with a token from `gauntlet users add`"


def get_app(request: Request) -> App:
    return request.app.state.gauntlet


def viewer(request: Request, _=Security(_bearer), app: App = Depends(get_app)) -> Viewer | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _sep, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"the Authorization header is not a bearer token: {_HOW}")
    found = service.authenticate(app, token)
    if found is None:
        raise Unauthorized(f"the token is not valid (unknown, removed or mistyped): {_HOW}")
    return found


def user(who: Viewer | None = Depends(viewer)) -> Viewer:
    """An account: every write needs one."""
    if who is None:
        raise Unauthorized(f"this request changes something and needs a token: {_HOW}")
    return who


def page_viewer(app: App):
    """Who asks for a web page: the account of a valid bearer token, else anonymous.

    Pages are reads by browsers, which send no token unless a script adds one; a bad
    token there shows the public pages rather than an error page.
    """

    def read(request: Request) -> Viewer | None:
        scheme, _sep, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return service.authenticate(app, token.strip())

    return read
