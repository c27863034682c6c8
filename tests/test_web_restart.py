"""The web process is not in a job's path (reliability checklist R10).

A real worker (its own process group, Redis broker, the SQLite job DB) and the real web app
(``python -m app``, which starts no worker of its own when ``REDIS_URL`` is set). The job is
launched through the app's Gradio API, the app is SIGKILLed mid-job and started again: the job
keeps training while no web process exists, succeeds on attempt 1, and the restarted app's
Monitor shows its whole history (every step once, no gaps) as a page reload would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
pytest.importorskip("celery")

import httpx  # noqa: E402
from test_auth import call  # noqa: E402
from worker_util import free_port, redis_server, start_stack, wait_for  # noqa: E402

from app import forms  # noqa: E402
from db import repo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
STEPS = 40  # 5120 tokens at the tiny-debug preset's 128 tokens per step


@contextlib.contextmanager
def web_app(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m app`` on ``port``, answering ``/config``; SIGKILLed on exit if still alive."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200
            return False

        wait_for(up, 120, f"the web app on port {port} (log: {log})", interval=0.25)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def session_call(c: httpx.Client, session: str, api_name: str, data: list[Any]) -> list[Any]:
    """Run a Gradio event in browser tab ``session`` (Gradio's queue protocol: join, then read
    the tab's event stream); its outputs. Unlike ``/gradio_api/call``, a tab keeps what earlier
    events changed, e.g. the Monitor dropdown's choices filled by ``on_jobs``."""
    deps = c.get("/config").json()["dependencies"]
    fn_index = next(i for i, d in enumerate(deps) if d.get("api_name") == api_name)
    join = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None}
    r = c.post("/gradio_api/queue/join", json=join)
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    with c.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed" and msg.get("event_id") == event_id:
                assert msg.get("success"), msg
                return list(msg["output"]["data"])
    raise AssertionError(f"{api_name}: the event stream ended without a result")


def loss_points(outputs: list[Any]) -> list[int]:
    """The x values (training tokens) of the Monitor's loss chart (on_pick's ``loss_plot``)."""
    from app.handlers import MONITOR_OUTPUTS

    plot = outputs[MONITOR_OUTPUTS.index("loss_plot")]
    fig = json.loads(plot["plot"]) if isinstance(plot.get("plot"), str) else plot["plot"]
    steps = [t for t in fig["data"] if (t.get("name") or "") == "training loss"]
    assert steps, [t.get("name") for t in fig["data"]]
    return [int(x) for x in steps[0]["x"]]


def test_killing_the_web_process_mid_job_loses_nothing(tmp_path: Path) -> None:
    from tiny import save_tiny_source, tiny_text

    src = save_tiny_source(tmp_path / "src")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_text(100 + i, 30) for i in range(6)), encoding="utf-8")
    data = tmp_path / "data"
    with redis_server(tmp_path / "redis") as redis:
        stack = start_stack(data, redis_url=redis.url(), db_url=None, step_delay_s=0.15)
        try:
            env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FAULT")}
            env.update(stack.settings.env())  # the same Redis, DB file, data dir and queue
            env.pop("EFFICIENTLLM_USERS", None)
            dataset = forms.save_upload(corpus, owner="local", data_root=data, max_bytes=2**24)
            values = forms.FormValues(
                preset="tiny-debug",
                model=str(src),
                budget="60%",
                dataset=dataset,
                total_tokens=5120,
            ).as_list()
            port, log = free_port(), tmp_path / "app.log"
            with web_app(env, port, log) as first:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                    msg = call(c, "on_launch", ["r10", *values])[0]
                assert "Queued job" in msg, msg
                job_id = msg.split("`")[1]
                wait_for(
                    lambda: len(repo.metrics(stack.sm, job_id=job_id)) >= 5,
                    120,
                    f"step 5 of job {job_id} (worker log: {stack.log})",
                )
                os.killpg(first.pid, signal.SIGKILL)  # the whole web process, mid-job
                first.wait(timeout=10)
                at_kill = len(repo.metrics(stack.sm, job_id=job_id))
            # no web process: the job trains on
            wait_for(
                lambda: len(repo.metrics(stack.sm, job_id=job_id)) >= at_kill + 3,
                60,
                "steps while the web app is down",
            )
            with web_app(env, port, log):
                job = stack.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 180)
                assert (job.status, job.attempt) == ("succeeded", 1), job.error_message
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                    session_call(c, "tab", "on_jobs", [None])  # the page load fills the list
                    outputs = session_call(c, "tab", "on_pick", [job_id])
            metrics = repo.metrics(stack.sm, job_id=job_id)
            assert [m.step for m in metrics] == list(range(1, STEPS + 1))  # each step once
            assert loss_points(outputs) == [m.tokens for m in metrics]  # all of it on the page
            status = outputs[0]
            assert "succeeded" in status, status
            print(f"R10: app killed at step {at_kill}; job succeeded on attempt 1")
        finally:
            stack.stop()
