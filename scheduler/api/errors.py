"""How the API answers errors: always JSON ``{"detail": ...}`` with a fitting status.

A ``GauntletError`` is the user's to fix: 400, or the status its class names (401,
403, 404, 409, 413, 429). An unreachable database or queue is 503. Anything else is a
bug: 500 with a fixed message, the traceback going to the server log only. No answer
echoes a request header, so a token cannot come back in an error.
"""

from __future__ import annotations

import json
import logging
import math

import redis
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gauntlet.cluster.errors import GauntletError

log = logging.getLogger("gauntlet.api")


def _finite(value):
    """NaN and infinities become null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class FiniteJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=False, allow_nan=False).encode()


def _answer(status: int, detail: str, **headers) -> JSONResponse:
    return FiniteJSONResponse({"detail": detail}, status_code=status, headers=headers or None)


async def _user_error(request: Request, exc: GauntletError) -> JSONResponse:
    status = getattr(exc, "status", 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return _answer(status, " ".join(str(exc).split()), **headers)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    part = "queue" if isinstance(exc, redis.RedisError) else "database"
    log.warning(
        "%s %s: the %s is unavailable (%s)",
        request.method,
        request.url.path,
        part,
        type(exc).__name__,
    )
    return _answer(503, f"the {part} is unavailable; try again shortly")


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _answer(500, "internal error; the server log has the details")


def install(api: FastAPI) -> None:
    api.add_exception_handler(GauntletError, _user_error)
    api.add_exception_handler(redis.RedisError, _unavailable)
    api.add_exception_handler(sa.exc.OperationalError, _unavailable)
    api.add_exception_handler(Exception, _bug)
