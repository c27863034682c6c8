"""Who is asking: a signed session cookie, the FastAPI dependency on it, and the login gate.

With login on (``EFFICIENTLLM_USERS``) every request but ``/login`` and ``/logout`` needs the
cookie that :mod:`app.login` sets after a correct password:

- :func:`user_of` reads it (HMAC-SHA256 over the user and issue time, keyed by the server secret
  *and* the user's password, so a changed password or a removed user ends old sessions);
- :func:`requirer` is the FastAPI dependency of our own routes (``/api/...``): 401 without it;
- the same :func:`user_of` is Gradio's ``auth_dependency`` (its public hook), so ``gr.Request``
  carries the user name into the handlers and Gradio's own routes check it too;
- :class:`LoginGate` answers before Gradio sees anything: a page load goes to ``/login``, any
  other request (the queue, uploads, files, the API) gets 401, so no job can be created.

Nothing here touches Gradio's internals. With login off every request is ``local``'s.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.context import LOCAL_USER, AppContext

COOKIE = "efficientllm_session"
OPEN_PATHS = frozenset({"/login", "/logout"})
"""The only paths served without a session (the login form itself and logging out)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, password: str, payload: str) -> str:
    key = secret + hashlib.sha256(password.encode("utf-8")).digest()
    return _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())


def sign(ctx: AppContext, user: str, *, now: float | None = None) -> str:
    """The cookie value for ``user`` (who must be one of ``ctx.users``)."""
    assert ctx.users is not None and user in ctx.users
    issued = int(time.time() if now is None else now)
    payload = _b64(json.dumps({"u": user, "t": issued}, separators=(",", ":")).encode("utf-8"))
    return f"{payload}.{_mac(ctx.secret_key, ctx.users[user], payload)}"


def verify(ctx: AppContext, token: str, *, now: float | None = None) -> str | None:
    """The user of a valid, unexpired cookie value; None for anything else (never raises)."""
    if not ctx.users or not token or len(token) > 4096:
        return None
    payload, _, mac = token.partition(".")
    try:
        data = json.loads(_unb64(payload))
        user, issued = data["u"], data["t"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(user, str) or not isinstance(issued, int) or user not in ctx.users:
        return None
    if not hmac.compare_digest(mac, _mac(ctx.secret_key, ctx.users[user], payload)):
        return None
    age = (time.time() if now is None else now) - issued
    return user if -60 <= age <= ctx.session_max_age_s else None


def user_of(ctx: AppContext, request: Any) -> str | None:
    """The user behind a request (``local`` with login off; None when not logged in).

    ``request`` is a Starlette request (our routes, Gradio's ``auth_dependency``) or anything
    with ``cookies``.
    """
    if not ctx.users:
        return LOCAL_USER
    return verify(ctx, request.cookies.get(COOKIE, ""))


def requirer(ctx: AppContext) -> Callable[[Request], str]:
    """A FastAPI dependency: the logged-in user, or 401 (the route body never runs)."""

    def require_user(request: Request) -> str:
        user = user_of(ctx, request)
        if user is None:
            raise HTTPException(status_code=401, detail="login required")
        return user

    return require_user


def set_cookie(response: Any, ctx: AppContext, user: str, *, secure: bool) -> None:
    """Attach the session cookie: HttpOnly, SameSite=Lax, Secure over HTTPS."""
    response.set_cookie(
        COOKIE,
        sign(ctx, user),
        max_age=int(ctx.session_max_age_s),
        httponly=True,
        samesite="lax",
        secure=secure,
        path="/",
    )


class LoginGate:
    """ASGI middleware: with login on, no request reaches the app without a valid session."""

    def __init__(self, app: ASGIApp, *, ctx: AppContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or not self.ctx.users
            or scope.get("path") in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if user_of(self.ctx, request) is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        accept = request.headers.get("accept", "")
        if request.method in ("GET", "HEAD") and "text/html" in accept:
            response: Any = RedirectResponse("/login", status_code=303)
        else:
            response = JSONResponse({"detail": "login required"}, status_code=401)
        await response(scope, receive, send)
