"""End to end in a real browser: ``python -m app`` (with its embedded local worker) on a tiny
model, driven by Playwright + Debian's chromium. Create a job, see the predicted architecture,
watch the per-layer chart change as pruning events arrive, refresh, cancel a second job, download
the export and load it with transformers, and generate text from it in the Playground."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip

missing = [m for m in ("playwright", "gradio", "plotly") if importlib.util.find_spec(m) is None]
if (
    importlib.util.find_spec("worker.embedded") is None
    or importlib.util.find_spec("worker.submit") is None
):
    missing.append("worker.embedded/worker.submit (worker/ not written yet)")
if not Path(CHROMIUM).exists():
    missing.append(CHROMIUM)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, Path, Path]]:
    """The app on a free port with its local worker; yields (url, data, source, corpus)."""
    from tiny import save_tiny_source, tiny_text

    src = save_tiny_source(tmp_path / "tiny-src")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": tiny_text(100 + i, 30)}) + "\n" for i in range(6))
    )
    data, port = tmp_path / "data", _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(EFFICIENTLLM_DATA=str(data), EFFICIENTLLM_USERS="alice:pw-a,bob:pw-b",
               APP_ENV="test", FAULT_STEP_DELAY_S="0.15", EFFICIENTLLM_EVENT_FLUSH_S="0.2",
               EFFICIENTLLM_TEST_THREADS="1", OMP_NUM_THREADS="1",
               EFFICIENTLLM_MODELS_DIR=str(tmp_path))  # fmt: skip
    log = (tmp_path / "app.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port)], cwd=ROOT, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/login", timeout=1)  # login on: the rest is 401
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url, data, src, corpus
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down; atexit stops the worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def choose(page, elem_id: str, text: str) -> None:
    """Pick the option containing ``text`` in a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.locator("ul[role='listbox'] li", has_text=text).first.click()


def set_custom(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill("")
    box.press_sequentially(value)
    box.press("Enter")
    box.press("Tab")


def launch(page, name: str, known: tuple[str, ...] = ()) -> str:
    """Launch the form as job ``name``; returns the new job id (the UI moves to the monitor)."""
    page.get_by_role("tab", name="New job").click()
    page.locator("#job-name textarea, #job-name input").first.fill(name)
    msg = page.locator("#new-msg")
    page.locator("#launch").click()
    for _ in range(120):
        text = msg.text_content() or ""
        found = re.search(r"Queued job \W?([0-9a-f]{32})", text)
        if found and found[1] not in known:
            return found[1]
        time.sleep(0.25)
    raise AssertionError(f"no job queued: {msg.text_content()!r}")


def caption(page) -> str:
    return page.locator("#arch-caption").inner_text()


def test_launch_watch_cancel_download(server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, data, src, corpus = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900}, accept_downloads=True)
        page.set_default_timeout(30_000)
        page.goto(url)
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("pw-a")
        page.get_by_role("button", name="Login").click()
        page.get_by_role("tab", name="New job").wait_for()

        # the form: preset, model folder, budget, uploaded dataset; then the prediction
        choose(page, "preset", "tiny-debug")
        set_custom(page, "model", str(src))
        page.locator("#budget textarea, #budget input").first.fill("60%")
        page.locator("#upload input[type=file]").set_input_files(str(corpus))
        page.locator("#new-msg", has_text="Uploaded as").wait_for()
        page.locator("#predict").click()
        page.locator("#new-msg", has_text="Predicted:").wait_for()
        page.locator("#predicted-plot .main-svg").first.wait_for()
        text = page.locator("#new-msg").inner_text()
        predicted = int(re.search(r"Predicted:\W*([\d,]+)", text)[1].replace(",", ""))
        assert predicted < 10**6, text  # the tiny source, not the default demo model

        # bad input: an inline message, nothing queued
        page.locator("#budget textarea, #budget input").first.fill("lots")
        page.locator("#launch").click()
        page.locator("#new-msg", has_text="Cannot do that").wait_for()
        page.locator("#budget textarea, #budget input").first.fill("60%")

        first = launch(page, "first")
        second = launch(page, "second", known=(first,))  # queued behind the first (one worker)
        page.get_by_role("tab", name="Monitor").click()
        page.locator("#cancel").click()
        page.locator("#monitor-status", has_text="cancelled").wait_for()

        choose(page, "monitor-job", first[:8])
        seen, deadline = set(), time.time() + 240
        while time.time() < deadline:
            seen.add(caption(page).split(" · ")[0])
            if "succeeded" in page.locator("#monitor-status").inner_text():
                break
            time.sleep(0.5)
        assert "succeeded" in page.locator("#monitor-status").inner_text()
        assert len(seen) >= 3, seen  # the per-layer chart moved through several snapshots
        page.locator("#download-link").wait_for()
        time.sleep(1.5)
        shot = tmp_path / "monitor.png"  # UPDATE_DOCS=1 refreshes the README's picture
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("UPDATE_DOCS") == "1":
            DOCS.mkdir(exist_ok=True)
            shot.replace(DOCS / "monitor.png")

        # refresh: the jobs survive (all state is in the DB)
        page.reload()
        page.get_by_role("tab", name="Jobs").click()
        table = page.locator("#jobs-table")
        table.filter(has_text="first").wait_for()
        assert "succeeded" in table.inner_text() and "cancelled" in table.inner_text()

        # download, then load the export with transformers
        page.get_by_role("tab", name="Monitor").click()
        choose(page, "monitor-job", first[:8])
        with page.expect_download() as info:
            page.locator("#download-link").click()
        zpath = tmp_path / "export.zip"
        info.value.save_as(zpath)
        with page.expect_download() as info:  # the run's GGUF file for llama.cpp
            page.locator("#download-gguf").click()
        gpath = tmp_path / "model.gguf"
        info.value.save_as(gpath)
        gguf_name = info.value.suggested_filename

        # the Playground: bad input is an inline message; then one generation on the worker
        page.get_by_role("tab", name="Playground").click()
        choose(page, "play-job", first[:8])
        page.locator("#play-generate").click()
        page.locator("#play-msg", has_text="prompt is empty").wait_for()
        page.locator("#play-prompt textarea").fill("It is a truth universally")
        page.locator("#play-generate").click()
        page.locator("#play-msg", has_text="succeeded").wait_for(timeout=60_000)
        played = page.locator("#play-output textarea").input_value()
        assert page.request.get(f"{url}/api/jobs/{first}/artifact").status == 200  # the owner

        # another user sees none of alice's jobs and cannot download or cancel them
        bob = browser.new_page(viewport={"width": 1300, "height": 900})
        bob.goto(url)
        bob.get_by_label("username").fill("bob")
        bob.get_by_label("password").fill("pw-b")
        bob.get_by_role("button", name="Login").click()
        bob.get_by_role("tab", name="Jobs").click()
        time.sleep(4)  # a Jobs-table refresh
        bob_table = bob.locator("#jobs-table").inner_text()
        assert "first" not in bob_table and "second" not in bob_table
        bob.get_by_role("tab", name="Monitor").click()
        bob.locator("#monitor-job input").click()
        assert bob.locator("ul[role='listbox'] li", has_text=first[:8]).count() == 0
        assert bob.request.get(f"{url}/api/jobs/{first}/artifact").status == 404
        assert bob.request.get(f"{url}/api/jobs/{first}/artifact?format=gguf").status == 404
        # the header names the user; its "Log out" link ends the session
        bob.locator("#whoami", has_text="Signed in as bob").wait_for()
        bob.locator("#whoami").get_by_role("link", name="Log out").click()
        bob.get_by_label("username").wait_for()  # back on the login page
        assert bob.url.rstrip("/").endswith("/login")
        assert bob.request.get(f"{url}/config").status == 401
        browser.close()

    import urllib.error

    for who in (first, second, "../../etc/passwd", "a" * 32):  # logged out: 401 before lookup
        for query in ("", "?format=gguf"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{url}/api/jobs/{who}/artifact{query}", timeout=5)
            assert err.value.code == 401

    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
        assert "export/config.json" in names and any(n.endswith(".safetensors") for n in names)
        zf.extractall(tmp_path / "unzipped")
    from efficientllm.export import load_exported

    model = load_exported(tmp_path / "unzipped" / "export")
    n = sum(p.numel() for p in model.parameters())

    import gguf

    from efficientllm.export.llamacpp import greedy_gguf, load_gguf

    reader = gguf.GGUFReader(gpath)
    assert gguf_name.endswith("model-q8_0.gguf")
    assert sum(int(t.n_elements) for t in reader.tensors) == n  # the same model, tied once
    llm = load_gguf(gpath, n_ctx=64, extra_buffers=False)
    assert len(greedy_gguf(llm, [1, 2, 3, 4], 4)) == 4  # llama.cpp runs the download

    import db
    from db import repo

    sm = db.session_factory(db.make_engine(f"sqlite:///{data / 'efficientllm.db'}"))
    job1, job2 = repo.get_job(sm, job_id=first), repo.get_job(sm, job_id=second)
    assert job2.status == "cancelled" and job2.started_at is None
    assert job1.params == n and job1.budget * 0.995 <= n <= job1.budget
    assert predicted <= job1.budget  # the prediction shown before launch is below the budget
    from sqlalchemy import select

    from db.models import Generation

    with sm() as s:
        gens = list(s.scalars(select(Generation).where(Generation.job_id == first)))
    assert [(g.status, g.owner, g.prompt) for g in gens] == [
        ("succeeded", "alice", "It is a truth universally")
    ]
    assert played and played == gens[0].output  # the worker's text is what the page shows
