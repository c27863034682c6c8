"""Our own HTTP routes under arbitrary input (reliability checklist S10).

Schemathesis needs an OpenAPI schema of the routes, and the app publishes none of ours
(``openapi_url=None``; the schemas served are Gradio's, of Gradio's routes); Hypothesis drives the
same idea over the routes we wrote (``/login``, ``/logout``,
``/api/jobs/{id}/artifact``), logged in and not, 50 examples per operation: no answer is a 5xx,
each is one of the route's documented statuses, and no body echoes a password.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("gradio")
pytest.importorskip("worker.submit")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_auth import USERS, make_ctx  # noqa: E402

from app import auth  # noqa: E402
from app.main import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# any text, including control characters, NUL, lone surrogates' neighbours, RTL and emoji
TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
SEGMENT = st.one_of(TEXT, st.sampled_from(["..", ".", "%2e%2e", "a" * 32, "", "%00", "%2F"]))


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TestClient]]:
    """Logged out and logged in (alice) clients of one app with login on."""
    ctx = make_ctx(tmp_path_factory.mktemp("fuzz"), USERS)
    app = create_app(ctx)
    out = {"anon": TestClient(app), "alice": TestClient(app, client=("10.9.9.9", 1))}
    for c in out.values():
        c.__enter__()
    r = out["alice"].post("/login", data={"username": "alice", "password": USERS["alice"]})
    assert r.status_code == 200 and auth.COOKIE in out["alice"].cookies
    yield out
    for c in out.values():
        c.__exit__(None, None, None)


def _ok(r: Any, allowed: set[int]) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert r.status_code in allowed, (r.status_code, r.text[:500])


@FUZZ
@given(job_id=SEGMENT, fmt=st.one_of(st.none(), TEXT))
def test_artifact_route(clients: dict[str, TestClient], job_id: str, fmt: str | None) -> None:
    path = f"/api/jobs/{urllib.parse.quote(job_id, safe='')}/artifact"
    params = {} if fmt is None else {"format": fmt}
    _ok(clients["anon"].get(path, params=params), {401, 404})
    # alice owns no job: 400 for a bad format, else 404 (never a file, never a 5xx); an empty
    # or dot segment can leave the route (404 from the router, 307/405 from Gradio's mount)
    _ok(clients["alice"].get(path, params=params), {400, 404, 405, 307})


@FUZZ
@given(
    user=TEXT,
    password=TEXT,
    extra=st.dictionaries(TEXT, TEXT, max_size=3),
    ip=st.integers(0, 2**24 - 1),
)
def test_login_route(
    clients: dict[str, TestClient], user: str, password: str, extra: Any, ip: int
) -> None:
    host = f"10.{ip >> 16}.{(ip >> 8) & 255}.{ip & 255}"  # mostly fresh: the 401 path, not 429
    c = TestClient(clients["anon"].app, client=(host, 2))
    r = c.post("/login", data={**extra, "username": user, "password": password})
    _ok(r, {200, 303, 401, 429})
    if r.status_code != 303 and len(password) >= 4:
        assert password not in r.text  # the page never echoes what was typed
    _ok(c.get("/login", params={"next": password}), {200})


@FUZZ
@given(body=st.binary(max_size=2000), ctype=st.sampled_from(["", "multipart/form-data", "x/y"]))
def test_login_route_raw_bodies(clients: dict[str, TestClient], body: bytes, ctype: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    r = clients["anon"].post("/login", content=body, headers=headers)
    _ok(r, {400, 401, 422, 429})


@FUZZ
@given(method=st.sampled_from(["GET", "POST"]), query=TEXT)
def test_logout_route(clients: dict[str, TestClient], method: str, query: str) -> None:
    r = clients["anon"].request(method, "/logout", params={"q": query}, follow_redirects=False)
    _ok(r, {303})
    assert r.headers["location"] == "/login"


def test_no_schema_of_our_routes_is_published(clients: dict[str, TestClient]) -> None:
    """Why Schemathesis is not used: the schemas served are Gradio's own (its mounted app's
    ``/openapi.json`` and ``/gradio_api/openapi.json``), none describes our routes, and with
    login on an anonymous client gets none of them."""
    for path in ("/openapi.json", "/gradio_api/openapi.json"):
        r = clients["alice"].get(path)
        assert r.status_code == 200 and "/api/jobs" not in r.text, path
        assert clients["anon"].get(path).status_code == 401, path
    for path in ("/docs", "/redoc"):
        assert clients["alice"].get(path).status_code == 404, path
