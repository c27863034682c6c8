"""``/login`` (a small form), ``/logout`` and the failed-login rate limit.

Gradio's built-in ``auth=`` has no rate limit and no lockout; this form refuses a login for a
user name or a client address that failed :data:`MAX_FAILURES` times within the last
:data:`WINDOW_S` seconds (429 with ``Retry-After``), even when the password is right, so a
password cannot be guessed faster than that. The client address is the TCP peer's
(``X-Forwarded-For`` is not trusted: behind a proxy, all clients share the proxy's budget).
The counts live in the web process's memory: one budget per process, reset by a restart.
"""

from __future__ import annotations

import hmac
import html
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from app import auth
from app.context import AppContext

MAX_FAILURES = 5
WINDOW_S = 60.0
MAX_KEYS = 10_000
"""Failure histories kept at most (expired ones are dropped first), so a flood of made-up
user names cannot grow the server's memory without bound."""


class FailureLimiter:
    """Failed attempts per key (``user:<name>``, ``ip:<addr>``) in a sliding window."""

    def __init__(
        self,
        *,
        limit: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        """``key``'s failures within the window (older ones dropped)."""
        q = self._fails.get(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, keys: Iterable[str]) -> int:
        """Seconds until every key may try again (0: allowed now)."""
        with self._lock:
            now, wait = self.clock(), 0.0
            for key in keys:
                q = self._recent(key, now)
                if len(q) >= self.limit:
                    wait = max(wait, q[-self.limit] + self.window_s - now)
            return math.ceil(wait)

    def fail(self, keys: Iterable[str]) -> None:
        """Record one failed attempt for each key."""
        with self._lock:
            now = self.clock()
            if len(self._fails) >= MAX_KEYS:
                for key in list(self._fails):
                    if not self._recent(key, now):
                        del self._fails[key]
                if len(self._fails) >= MAX_KEYS:  # still full: forget the oldest half
                    for key in list(self._fails)[: MAX_KEYS // 2]:
                        del self._fails[key]
            for key in keys:
                self._fails.setdefault(key, deque()).append(now)

    def clear(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EfficientLLM: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:22rem;margin:4rem auto;padding:0 1rem}}
label,input,button{{display:block;width:100%;margin:.3rem 0;font-size:1rem;box-sizing:border-box}}
input{{padding:.4rem}}button{{padding:.5rem;margin-top:1rem}}
.msg{{color:#b00020}}</style></head>
<body><h1>EfficientLLM</h1>
<p class="msg" role="alert">{message}</p>
<form method="post" action="/login">
<label for="username">Username</label>
<input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Login</button>
</form></body></html>
"""


def page(
    message: str = "", *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The login form with an (escaped) message above it."""
    return HTMLResponse(
        _PAGE.format(message=html.escape(message)), status_code=status, headers=headers
    )


def _password_ok(ctx: AppContext, user: str, password: str) -> bool:
    """Constant-time comparison; an unknown user costs the same as a wrong password."""
    assert ctx.users is not None
    expected = ctx.users.get(user, "\0" * 32)
    ok = hmac.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))
    return ok and user in ctx.users


def router(ctx: AppContext, limiter: FailureLimiter) -> APIRouter:
    """The login and logout routes, bound to the app context and its limiter."""
    api = APIRouter()

    @api.get("/login", response_model=None)
    def login_form(request: Request) -> Response:
        if not ctx.users or auth.user_of(ctx, request) is not None:
            return RedirectResponse("/", status_code=303)
        return page()

    @api.post("/login", response_model=None)
    async def login(request: Request) -> Response:
        if not ctx.users:
            return RedirectResponse("/", status_code=303)
        form = await request.form()
        user, password = str(form.get("username") or ""), str(form.get("password") or "")
        host = request.client.host if request.client else "unknown"
        keys = [f"user:{user[:128]}", f"ip:{host}"]
        wait = limiter.retry_after(keys)
        if wait:
            return page(
                f"Too many failed logins; try again in {wait} s.",
                status=429,
                headers={"Retry-After": str(wait)},
            )
        if not _password_ok(ctx, user, password):
            limiter.fail(keys)
            return page("Wrong username or password.", status=401)
        limiter.clear(keys[0])
        response = RedirectResponse("/", status_code=303)
        auth.set_cookie(response, ctx, user, secure=request.url.scheme == "https")
        return response

    @api.api_route("/logout", methods=["GET", "POST"], response_model=None)
    def logout() -> Response:
        response = RedirectResponse("/login" if ctx.users else "/", status_code=303)
        response.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="lax")
        return response

    return api
