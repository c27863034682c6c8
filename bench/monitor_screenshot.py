"""Screenshot of the Monitor during a real run (for the README): starts ``python -m app`` with its
embedded worker in a temporary data folder, launches the ``cpu-demo`` preset (the real
SmolLM2-135M demo model on Austen) from the New-job form, waits for some pruning events and saves
a full-page PNG. Needs the demo model prepared (``efficientllm demo-model``) and /usr/bin/chromium.

    python bench/monitor_screenshot.py docs/monitor-cpu-demo.png --events 6
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--events", type=int, default=6, help="pruning events to wait for")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    data, port = Path(tempfile.mkdtemp()) / "data", _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["EFFICIENTLLM_DATA"] = str(data)
    app = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/config", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(url)
            page.get_by_role("tab", name="New job").click()
            page.locator("#job-name textarea, #job-name input").first.fill("cpu-demo")
            page.locator("#launch").click()
            deadline = time.time() + args.timeout
            while time.time() < deadline:
                text = page.locator("#new-msg").text_content() or ""
                if re.search(r"Queued job", text):
                    break
                time.sleep(0.5)
            print("launched:", page.locator("#new-msg").text_content(), flush=True)
            db = sqlite3.connect(data / "efficientllm.db")
            while time.time() < deadline:  # the DB says how far the run is
                (n,) = db.execute("select count(*) from arch_snapshots").fetchone()
                if n > args.events:
                    break
                time.sleep(2)
            print("snapshots:", n, flush=True)
            page.get_by_role("tab", name="Monitor").click()
            time.sleep(6)  # a few timer ticks
            time.sleep(3)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.send_signal(signal.SIGINT)
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
