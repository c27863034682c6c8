"""Gradio's own HTTP surface against the real app object (FastAPI + mounted Gradio, TestClient),
login off (the single-user app) and login on as a signed-in user: its file, proxy and
component-server routes serve no local file and open no loopback connection (S6), an event
given a ``FileData`` path outside Gradio's upload cache reads nothing (S6), and
``/gradio_api/upload`` enforces ``max_upload_bytes`` without writing the refused bytes (S7)."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
pytest.importorskip("worker.submit")

from fastapi.testclient import TestClient  # noqa: E402
from test_auth import USERS, call, jobs, make_ctx  # noqa: E402

from app import auth, forms  # noqa: E402
from app.context import AppContext  # noqa: E402
from app.main import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(120)
SECRET = "efficientllm-s6-canary-5b1e0c7d"
"""Planted in files the app must never serve or read; no response may contain it."""
LEAKS = (SECRET, "root:x:0:0", "PATH=")  # ... nor /etc/passwd's or /proc/self/environ's content
LIMIT = 10**5  # max_upload_bytes of these tests


class Canary:
    """A TCP listener on 127.0.0.1 whose thread counts the connections it accepts: any is an
    SSRF attempt. :meth:`close` connects once more from a known port and waits until the thread
    accepts that one, so every earlier connection has been counted (no sleeps, no races)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._last: Any = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            conn, peer = self.sock.accept()
            conn.close()
            if peer == self._last:
                return
            self.accepted += 1

    def close(self) -> int:
        if self._thread.is_alive():
            with socket.socket() as last:
                last.bind(("127.0.0.1", 0))
                self._last = last.getsockname()
                last.connect(("127.0.0.1", self.port))
                self._thread.join(30)
            self.sock.close()
        return self.accepted


@dataclasses.dataclass
class Site:
    ctx: AppContext
    client: TestClient
    cache: Path
    """Gradio's upload cache (``GRADIO_TEMP_DIR``)."""
    secret: Path
    """A readable ``.txt`` outside the cache holding :data:`SECRET`."""


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


@pytest.fixture(params=["login-off", "login-on"])
def site(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app with its data dir as the process cwd (so ``file=subdir/.env`` names a real
    dotfile), Gradio's cache in ``tmp_path`` (read when the app is built), and a client that
    reports server errors as 500s; with login on it is signed in as alice."""
    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "subdir").mkdir()
    (tmp_path / "subdir" / ".env").write_text(f"SECRET_KEY={SECRET}\n")
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(f"{SECRET}\n" * 20)
    users = USERS if request.param == "login-on" else None
    ctx = dataclasses.replace(make_ctx(tmp_path, users), max_upload_bytes=LIMIT)
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        if users:
            r = client.post("/login", data={"username": "alice", "password": USERS["alice"]})
            assert r.status_code == 200 and auth.COOKIE in client.cookies, r.text
        yield Site(ctx, client, cache, secret)


def refused(r: Any, what: str) -> None:
    """A 4xx whose body holds none of :data:`LEAKS`."""
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    assert not any(leak in r.text for leak in LEAKS), (what, r.text[:300])


def cache_files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in cache.rglob("*") if p.is_file()}


def uploaded(ctx: AppContext) -> list[Path]:
    return sorted(p for p in (ctx.data_dir / "uploads").rglob("*") if p.is_file())


def file_route_probes(secret: Path, port: int) -> list[str]:
    """The paths and URLs replayed under every Gradio file route."""
    return [
        "/etc/passwd",
        "/proc/self/environ",
        str(secret),
        "subdir/.env",
        "subdir%2f.env",
        "../x",
        "//h/s",
        "..%2f..%2f..%2f..%2fetc%2fpasswd",
        "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "%252e%252e%252fetc%252fpasswd",
        "%2Fetc%2Fpasswd",
        *loopback_urls(port),
    ]


def loopback_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/",
        f"http://localhost:{port}/x.txt",
        f"http://0.0.0.0:{port}/",
        f"http://2130706433:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
    ]


# ---- S6: file, proxy and component-server routes ----------------------------------------------
def test_canary_counts_every_connection(canary: Canary) -> None:
    for _ in range(3):
        socket.create_connection(("127.0.0.1", canary.port)).close()
    assert canary.close() == 3  # so the 0s below mean no connection, not a deaf canary


def test_file_and_proxy_routes_serve_no_local_file_and_open_no_connection(
    site: Site, canary: Canary
) -> None:
    c = site.client
    for target in file_route_probes(site.secret, canary.port):
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
            refused(c.get(route + target), route + target)
    for url in loopback_urls(canary.port):
        refused(c.get("/gradio_api/proxy=" + url), "proxy=" + url)
    assert canary.close() == 0
    # the routes are live: a file Gradio itself holds (a real upload) is served
    r = c.post("/gradio_api/upload", files={"files": ("ok.txt", b"served\n")})
    assert r.status_code == 200, r.text
    assert c.get("/gradio_api/file=" + r.json()[0]).text == "served\n"


def test_component_server_moves_no_file(site: Site) -> None:
    upload_id = upload_dependency(site.client)["inputs"][0]
    for fn in ("move_resource_to_block_cache", "async_move_resource_to_block_cache",
               "serve_static_file", "preprocess", "ls"):  # fmt: skip
        body = {"session_hash": "s6", "component_id": upload_id, "fn_name": fn,
                "data": str(site.secret)}  # fmt: skip
        refused(site.client.post("/gradio_api/component_server", json=body), fn)
    assert not any(SECRET.encode() in b for b in cache_files(site.cache).values())


@pytest.mark.xfail(
    strict=True, reason="Gradio 6.31 indexes blocks[component_id] unchecked: KeyError -> 500"
)
def test_component_server_unknown_component_is_a_4xx(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, None)
    with TestClient(create_app(ctx), raise_server_exceptions=False) as c:
        body = {"session_hash": "s6", "component_id": 10**6, "fn_name": "ls", "data": None}
        refused(c.post("/gradio_api/component_server", json=body), "unknown component")


# ---- S6: an event given a FileData path outside Gradio's cache -----------------------------------
def upload_dependency(c: TestClient) -> dict[str, Any]:
    """The config entry of the dataset upload event (``upload.upload(h.on_upload, ...)``)."""
    deps = c.get("/config").json()["dependencies"]
    (dep,) = [d for d in deps if d.get("api_name") == "on_upload"]
    return dep


def file_data(path: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "orig_name": Path(path).name or "x.txt",
            "meta": {"_type": "gradio.FileData"}, **extra}  # fmt: skip


def test_upload_event_never_reads_a_file_it_was_not_sent(site: Site, canary: Canary) -> None:
    """The handler copies the event's file into the user's datasets: a ``path`` naming any other
    server file (a secret .txt, another user's dataset, /etc/passwd, a dotfile, a loopback URL)
    must be refused before it runs, over ``/gradio_api/call`` and ``/gradio_api/queue/join``."""
    c, ctx = site.client, site.ctx
    other = forms.uploads_dir(ctx.data_dir, "bob") / "0123456789ab-theirs.txt"
    other.parent.mkdir(parents=True)
    other.write_text(f"{SECRET} bob's dataset\n")
    payloads = [
        file_data(str(site.secret)),
        file_data(str(other)),
        file_data("subdir/../private/secret.txt"),
        file_data("subdir/.env"),
        file_data("/etc/passwd"),
        file_data(f"http://127.0.0.1:{canary.port}/data.txt"),
        file_data(str(site.secret), url=f"http://127.0.0.1:{canary.port}/data.txt"),
    ]
    cache_before = cache_files(site.cache)
    for fd in payloads:
        out = call(c, "on_upload", [fd], want="error")
        assert SECRET not in json.dumps(out), fd
    dep = upload_dependency(c)
    for i, fd in enumerate(payloads):
        session = f"s6-{i}"
        body = {"data": [fd], "fn_index": dep["id"], "trigger_id": dep["targets"][0][0],
                "session_hash": session, "event_data": None}  # fmt: skip
        r = c.post("/gradio_api/queue/join", json=body)
        assert r.status_code == 200 and "event_id" in r.json(), r.text
        with c.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
            text = "".join(stream.iter_text())
        assert '"msg":"process_completed"' in text and '"success":false' in text, text[-500:]
        assert not any(leak in text for leak in LEAKS), text[-500:]
    assert canary.close() == 0
    assert uploaded(ctx) == [other]  # no dataset made from any of them
    new = {k: v for k, v in cache_files(site.cache).items() if cache_before.get(k) != v}
    assert not any(SECRET.encode() in b or b"root:" in b for b in new.values()), list(new)
    assert jobs(ctx) == []
    # the event works for a file the client really uploaded (so the refusals are the check)
    r = c.post("/gradio_api/upload", files={"files": ("mine.txt", b"a real dataset\n")})
    assert r.status_code == 200, r.text
    msg = call(c, "on_upload", [file_data(r.json()[0])])[0]
    assert msg.startswith("Uploaded as `upload:"), msg
    (mine,) = [p for p in uploaded(ctx) if p != other]
    assert mine.read_bytes() == b"a real dataset\n"


# ---- S7: upload limit -------------------------------------------------------------------------
def test_upload_over_the_limit_is_413_and_writes_nothing(site: Site) -> None:
    c = site.client
    before = cache_files(site.cache)
    big = b"\xab" * (LIMIT + 1)
    r = c.post("/gradio_api/upload", files={"files": ("big.txt", big)})
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert cache_files(site.cache) == before  # not even a partial temp file is left
    files = [p for p in site.ctx.data_dir.rglob("*") if p.is_file()]  # the cache is inside
    assert not any(b"\xab" * 1024 in p.read_bytes() for p in files)
    # exactly the limit is accepted and stored whole (the route works; 413 is the limit)
    exact = b"\xcd" * LIMIT
    r = c.post("/gradio_api/upload", files={"files": ("exact.txt", exact)})
    assert r.status_code == 200, r.text
    (path,) = r.json()
    assert Path(path).resolve().is_relative_to(site.cache.resolve())
    assert Path(path).read_bytes() == exact
    added = set(cache_files(site.cache)) - set(before)
    assert [(site.cache / k).resolve() for k in added] == [Path(path).resolve()]
