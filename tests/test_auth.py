"""Multi-user hardening against the real app object (FastAPI + mounted Gradio, TestClient):
login required everywhere (S9), per-user isolation (S8), the login rate limit, the per-user job
limit (L2) and login off = the single-user app unchanged."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
pytest.importorskip("worker.submit")

import gradio as gr  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import db  # noqa: E402
from app import auth, forms  # noqa: E402
from app.context import AppContext  # noqa: E402
from app.handlers import Handlers  # noqa: E402
from app.login import FailureLimiter  # noqa: E402
from app.main import create_app  # noqa: E402
from db import repo  # noqa: E402
from db.models import Job  # noqa: E402

USERS = {"alice": "pw-a", "bob": "pw-b"}
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Job ids the app rang the broker for (no broker in these tests)."""
    import worker.celery_app

    calls: list[str] = []

    def fake_enqueue(job_id: str, **_: Any) -> str:
        calls.append(job_id)
        return "task-" + job_id

    monkeypatch.setattr(worker.celery_app, "enqueue", fake_enqueue)
    return calls


def make_ctx(tmp_path: Path, users: dict[str, str] | None, **kw: Any) -> AppContext:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.upgrade_to_head(engine)
    models = (tmp_path / "models").resolve()
    models.mkdir(exist_ok=True)
    return AppContext(
        sessions=db.session_factory(engine),
        data_dir=tmp_path.resolve(),
        users=users,
        max_upload_bytes=10**6,
        models_dir=models if users else None,
        **kw,
    )


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    return make_ctx(tmp_path, USERS, max_active_jobs=2)


@pytest.fixture
def app(ctx: AppContext) -> Any:
    return create_app(ctx)


@pytest.fixture
def client() -> Iterator[Callable[..., TestClient]]:
    """``client(app, user=None, host=...)``: a TestClient (logged in as ``user``), closed after."""
    opened: list[TestClient] = []

    def make(app: Any, user: str | None = None, host: str = "testclient") -> TestClient:
        c = TestClient(app, client=(host, 50000))
        c.__enter__()  # runs the lifespan: starts Gradio's queue
        opened.append(c)
        if user is not None:
            r = c.post("/login", data={"username": user, "password": USERS[user]})
            assert r.status_code == 200 and auth.COOKIE in c.cookies, r.text  # followed to "/"
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def call(c: TestClient, api_name: str, data: list[Any], *, want: str = "complete") -> Any:
    """Run a Gradio event through its HTTP API (``/gradio_api/call``) as ``c``'s user; the data
    of its last SSE event, which must be ``want`` (``complete`` or ``error``)."""
    r = c.post(f"/gradio_api/call/{api_name}", json={"data": data})
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    with c.stream("GET", f"/gradio_api/call/{api_name}/{event_id}") as stream:
        text = "".join(stream.iter_text())
    event, payload = None, None
    for line in text.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event in ("complete", "error"):
            payload = (event, json.loads(line.split(":", 1)[1]))
    assert payload is not None and payload[0] == want, text[-2000:]
    return payload[1]


def launch_values(ctx: AppContext, name: str = "job") -> list[Any]:
    from tiny import save_tiny_source

    src = ctx.models_dir / "tiny" if ctx.models_dir else ctx.data_dir / "tiny"
    if not (src / "config.json").is_file():
        save_tiny_source(src)
    fv = forms.FormValues(preset="tiny-debug", model=str(src), budget="60%")
    return [name, *fv.as_list()]


def jobs(ctx: AppContext) -> list[Job]:
    return repo.list_jobs(ctx.sessions)


# ---- S9: nothing without a session ------------------------------------------------------------
def test_unauthenticated_requests_get_401_or_login_and_create_no_job(
    app: Any, ctx: AppContext, sent: list[str], client: Callable[..., TestClient]
) -> None:
    c = client(app)
    page = c.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    job_id, launch = "a" * 32, ["x", *forms.FormValues().as_list()]  # never reaches a handler
    for method, path, body in [
        ("GET", "/", None),
        ("GET", "/config", None),
        ("GET", "/gradio_api/info", None),
        ("POST", "/gradio_api/call/on_launch", {"data": launch}),
        ("POST", "/gradio_api/queue/join", {"data": launch, "fn_index": 5,
                                            "session_hash": "x1", "event_data": None}),
        ("GET", "/gradio_api/queue/data?session_hash=x1", None),
        ("POST", "/gradio_api/run/on_launch", {"data": launch}),
        ("POST", "/gradio_api/upload", None),
        ("GET", "/gradio_api/file=/etc/passwd", None),
        ("GET", "/gradio_api/user", None),
        ("GET", f"/api/jobs/{job_id}/artifact", None),
        ("GET", f"/api/jobs/{job_id}/artifact?format=gguf", None),
    ]:  # fmt: skip
        r = c.request(method, path, json=body, follow_redirects=False)
        assert r.status_code == 401, (method, path, r.status_code)
        assert "root:" not in r.text
    assert jobs(ctx) == [] and sent == []
    # forged, tampered, expired or foreign cookies are no session either
    good = auth.sign(ctx, "alice")
    payload, _, mac = good.partition(".")
    forged = auth.sign(dataclasses.replace(ctx, secret_key=b"another secret"), "alice")
    old = auth.sign(ctx, "alice", now=0)
    bob_payload = auth.sign(ctx, "bob").partition(".")[0]
    for cookie in [forged, old, f"{bob_payload}.{mac}", payload, good + "x", "", "."]:
        c.cookies.set(auth.COOKIE, cookie)
        assert c.get("/config").status_code == 401, cookie
    c.cookies.set(auth.COOKIE, good)
    assert c.get("/config").status_code == 200


def test_login_sets_a_signed_httponly_lax_cookie_and_logout_ends_it(
    app: Any, client: Callable[..., TestClient]
) -> None:
    c = client(app)
    assert "Username" in c.get("/login").text
    r = c.post("/login", data={"username": "alice", "password": "pw-a"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    assert c.get("/").status_code == 200 and c.get("/gradio_api/user").json() == "alice"
    # the page's header names the user and links to /logout
    assert "whoami" in c.get("/config").text
    (line,) = call(c, "signed_in", [])
    assert "Signed in as <b>alice</b>" in line and 'href="/logout" target="_self"' in line
    assert c.get("/logout", follow_redirects=False).headers["location"] == "/login"
    assert c.get("/config").status_code == 401


# ---- login rate limit ---------------------------------------------------------------------
def test_sixth_failed_login_within_a_minute_is_refused(
    app: Any, client: Callable[..., TestClient]
) -> None:
    c = client(app)
    for _ in range(5):
        r = c.post("/login", data={"username": "alice", "password": "guess"})
        assert r.status_code == 401 and "Wrong username or password" in r.text
    r = c.post("/login", data={"username": "alice", "password": "pw-a"})  # right, but too late
    assert r.status_code == 429 and "Too many failed logins" in r.text
    assert 1 <= int(r.headers["retry-after"]) <= 60 and auth.COOKIE not in c.cookies
    # the same user from another address is refused too (per user), and the first address
    # for another user (per address); a fresh address and user are not
    other = client(app, host="10.0.0.2")
    assert other.post("/login", data={"username": "alice", "password": "pw-a"}).status_code == 429
    assert c.post("/login", data={"username": "bob", "password": "pw-b"}).status_code == 429
    assert client(app, "bob", host="10.0.0.3").get("/config").status_code == 200


def test_failure_window_slides() -> None:
    now = [1000.0]
    lim = FailureLimiter(limit=5, window_s=60, clock=lambda: now[0])
    keys = ["user:a", "ip:1"]
    for _ in range(5):
        assert lim.retry_after(keys) == 0
        lim.fail(keys)
        now[0] += 1
    assert lim.retry_after(keys) == 55  # the first failure leaves the window at 1060
    now[0] = 1060.5
    assert lim.retry_after(keys) == 0
    lim.clear("user:a")
    assert lim.retry_after(["user:a"]) == 0


# ---- S8: user B never sees, cancels or downloads user A's job -----------------------------
def test_jobs_are_owned_per_user_through_gradio_requests(
    app: Any, ctx: AppContext, sent: list[str], client: Callable[..., TestClient]
) -> None:
    alice, bob = client(app, "alice"), client(app, "bob")
    msg = call(alice, "on_launch", launch_values(ctx, "first"))[0]
    assert msg.startswith("Queued job"), msg
    (job,) = jobs(ctx)
    assert job.owner == "alice" and sent == [job.id]  # the user reached the handler
    export = ctx.data_dir / "runs" / job.id / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    rel = f"runs/{job.id}/export/config.json"
    repo.add_artifact(ctx.sessions, job_id=job.id, kind="export", path=rel, size_bytes=2, sha256="")

    assert job.id[:8] in json.dumps(call(alice, "on_jobs", [None]))
    assert job.id[:8] not in json.dumps(call(bob, "on_jobs", [None]))
    call(bob, "on_pick", [job.id], want="error")  # not among bob's dropdown choices
    # the handlers behind the picker and the cancel button, given a forged job id or state
    handlers, as_bob = Handlers(ctx), gr.Request(username="bob")
    assert handlers.on_pick(job.id, as_bob)[0] == "Choose a job."
    assert handlers.on_pick(job.id, gr.Request(username="alice"))[-1]["job_id"] == job.id
    assert handlers.on_cancel({"job_id": job.id}, as_bob) == "Cancel requested."
    assert repo.get_job(ctx.sessions, job_id=job.id).status == "queued"  # untouched
    assert bob.get(f"/api/jobs/{job.id}/artifact").status_code == 404
    assert bob.get(f"/api/jobs/{job.id}/artifact?format=gguf").status_code == 404
    r = alice.get(f"/api/jobs/{job.id}/artifact")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    handlers.on_cancel({"job_id": job.id}, gr.Request(username="alice"))
    assert repo.get_job(ctx.sessions, job_id=job.id).status == "cancelled"


# ---- L2: the per-user limit ------------------------------------------------------------------
def test_per_user_limit_refuses_the_next_job_with_a_message(
    app: Any, ctx: AppContext, sent: list[str], client: Callable[..., TestClient]
) -> None:
    alice, bob = client(app, "alice"), client(app, "bob")
    for i in range(2):  # ctx.max_active_jobs == 2
        assert call(alice, "on_launch", launch_values(ctx, f"j{i}"))[0].startswith("Queued job")
    msg = call(alice, "on_launch", launch_values(ctx, "j2"))[0]
    assert msg == (
        "**Cannot do that:** you already have 2 jobs queued or running (at most 2 per user); "
        "wait for one to finish or cancel one"
    )
    assert len(jobs(ctx)) == 2 and len(sent) == 2  # nothing created, nothing sent
    assert call(bob, "on_launch", launch_values(ctx, "b"))[0].startswith("Queued job")
    repo.request_cancel(ctx.sessions, job_id=jobs(ctx)[-1].id, owner="alice")  # one finishes
    assert call(alice, "on_launch", launch_values(ctx, "j3"))[0].startswith("Queued job")


def test_submit_job_limit_counts_queued_and_running(ctx: AppContext, sent: list[str]) -> None:
    from worker.submit import JobLimitError, submit_job

    fv = forms.FormValues(preset="tiny-debug", model="org/m")
    config = forms.form_to_config(fv, owner="u", data_root=ctx.data_dir)
    ids = [submit_job(ctx.sessions, config=config, owner="u", max_active=2) for _ in range(2)]
    with pytest.raises(JobLimitError, match="at most 2 per user"):
        submit_job(ctx.sessions, config=config, owner="u", max_active=2)
    assert repo.active_jobs(ctx.sessions, owner="u") == 2 and len(sent) == 2
    repo.claim_job(ctx.sessions, job_id=ids[0], worker_id="w:1", ttl_s=60)  # running counts
    with pytest.raises(JobLimitError):
        submit_job(ctx.sessions, config=config, owner="u", max_active=2)
    submit_job(ctx.sessions, config=config, owner="u")  # no limit given: none applied
    assert repo.active_jobs(ctx.sessions, owner="u") == 3


# ---- login off: the single-user app, unchanged ---------------------------------------------
def test_login_off_needs_no_session(
    tmp_path: Path, sent: list[str], client: Callable[..., TestClient]
) -> None:
    ctx = make_ctx(tmp_path, None)
    c = client(create_app(ctx))
    assert c.get("/config").status_code == 200
    assert "whoami" not in c.get("/config").text  # no "Signed in as" header, no logout link
    assert c.get("/", headers={"accept": "text/html"}).status_code == 200
    assert c.get(f"/api/jobs/{'a' * 32}/artifact").status_code == 404
    for i in range(5):  # no per-user limit and any local folder as the model
        assert call(c, "on_launch", launch_values(ctx, f"j{i}"))[0].startswith("Queued job")
    assert {j.owner for j in jobs(ctx)} == {"local"} and len(sent) == 5


def test_context_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.context import make_context

    for name in (
        "REDIS_URL",
        "DATABASE_URL",
        "EFFICIENTLLM_MODELS_DIR",
        "EFFICIENTLLM_QUEUE_MAX_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EFFICIENTLLM_DATA", str(tmp_path / "data"))
    off = make_context()
    assert (off.users, off.models_dir, off.max_active_jobs) == (None, None, None)
    assert off.queue_max_size == 256
    monkeypatch.setenv("EFFICIENTLLM_QUEUE_MAX_SIZE", "0")
    assert make_context().queue_max_size is None  # 0: unbounded
    monkeypatch.setenv("EFFICIENTLLM_USERS", "alice:pw-a")
    monkeypatch.setenv("EFFICIENTLLM_SECRET_KEY", "s3cret")
    monkeypatch.setenv("EFFICIENTLLM_MAX_ACTIVE_JOBS_PER_USER", "7")
    on = make_context()
    assert on.models_dir == (tmp_path / "data" / "models").resolve()
    assert (on.max_active_jobs, on.secret_key) == (7, b"s3cret")
    assert auth.verify(on, auth.sign(make_context(), "alice")) == "alice"  # survives a restart


# ---- S5: path traversal on download, logged in ----------------------------------------------
def test_download_never_serves_outside_the_artifacts_root(
    app: Any, ctx: AppContext, sent: list[str], client: Callable[..., TestClient]
) -> None:
    """S5: as the owner, traversal ids (plain, %-encoded, absolute) and a symlink planted in
    the job's folder (recorded as an export file and as the GGUF) all answer 404, and no body
    ever holds ``/etc/passwd``'s content."""
    alice = client(app, "alice")
    call(alice, "on_launch", launch_values(ctx, "s5"))
    (job,) = jobs(ctx)
    export = ctx.data_dir / "runs" / job.id / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    planted = ctx.data_dir / "runs" / job.id / "gguf"
    planted.mkdir()
    (planted / "model-q8_0.gguf").symlink_to("/etc/passwd")
    (export / "secrets.json").symlink_to("/etc/passwd")
    for kind, rel in (
        ("export", f"runs/{job.id}/export/config.json"),
        ("export", f"runs/{job.id}/export/secrets.json"),
        ("gguf", f"runs/{job.id}/gguf/model-q8_0.gguf"),
    ):
        repo.add_artifact(ctx.sessions, job_id=job.id, kind=kind, path=rel, size_bytes=2, sha256="")
    probes = [
        f"/api/jobs/{job.id}/artifact",  # the export names a planted link: refused whole
        f"/api/jobs/{job.id}/artifact?format=gguf",  # the GGUF is a planted link
        "/api/jobs/..%2F..%2F..%2Fetc%2Fpasswd/artifact",
        "/api/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/artifact",
        "/api/jobs/%2Fetc%2Fpasswd/artifact",
        "/api/jobs/../../etc/passwd/artifact",
        f"/api/jobs/{job.id}%2F..%2F..%2F..%2Fetc/artifact?format=gguf",
    ]
    for url in probes:
        r = alice.get(url)
        assert r.status_code == 404, (url, r.status_code)
        assert b"root:" not in r.content, url
