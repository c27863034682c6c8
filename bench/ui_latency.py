"""UI latency of the web app against the real app + real local workers on tiny models.

One run of ``python -m app`` (embedded local worker, SQLite DB and broker in a temp data dir)
plus extra ``python -m worker`` processes on the same data dir, a tiny random llama
(``tests/tiny.py``), preset ``tiny-debug`` and the worker's test-only per-step delay
(``APP_ENV=test``, ``FAULT_STEP_DELAY_S``), driven by Playwright + Debian's chromium.

1. **Pruning event -> Monitor.** One job is watched in the Monitor from before it starts. The
   ``events`` table has no insert timestamp, so the reference time is the event's own ``time``
   field (``time.time()`` when the trainer built the event; ``pruned`` is flushed to the DB at
   once). As a cross-check the bench also polls the DB (read-only sqlite3, every 50 ms) and
   records when each ``pruned`` row became visible. In the page, a 20 ms ``setInterval`` records
   ``Date.now()`` the first time each ``step N: pruned`` line is in the event log (and when the
   architecture caption first names that snapshot). Browser and server share this machine's
   clock (the offset is measured and reported).
2. **Five jobs at once.** Five jobs of the same owner on five workers (the embedded one and
   ``--workers - 1`` extra), longer than tiny-debug's default (``--load-tokens``) so that they
   run during the whole measurement. While they run:
   * Monitor job switch: pointerdown on a job in the Monitor's job dropdown -> the status line
     shows that job (each job has its own budget) and the per-layer chart's title matches the
     caption (in-page ``Date.now()``, checked every animation frame).
   * Jobs tab open: pointerdown on the "Jobs" tab -> the table lists all five jobs.
   * Jobs tab freshness: while the Jobs tab is open, the delay between a job's step reaching the
     DB (polled) and the table showing that step (the table refreshes on a 3 s timer).
   * Page reload: ``page.reload()`` -> Jobs tab clicked -> the table lists all five jobs.
   The Jobs list has no click-to-open (its Dataframe has no select handler), so "clicking a job
   in the Jobs list" is measured as switching the Monitor's job dropdown.

    python bench/ui_latency.py                 # ~5 min on 2 CPU cores
    python bench/ui_latency.py --switches 10 --reloads 2

Writes bench/results/ui_latency.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip
OWNER, PASSWORD = "alice", "pw-a"
GOAL_P95_S = 1.0
LOAD_BUDGETS = ("50%", "55%", "60%", "65%", "70%")

# Installed in every page (and again after each reload): timestamps with the page's Date.now().
INIT_JS = r"""
(() => {
  const B = (window.__bench = {pruned: {}, caption: {}, tables: [], click: null, done: null,
                               watchTable: false, lastTable: ''});
  document.addEventListener('pointerdown', (e) => {
    const t = e.target;
    if (t && t.closest && (t.closest('ul[role="listbox"] li') || t.closest('[role="tab"]')))
      B.click = Date.now();
  }, true);
  setInterval(() => {
    const now = Date.now();
    const ta = document.querySelector('#event-log textarea');
    if (ta) for (const m of ta.value.matchAll(/step (\d+): pruned/g))
      if (!(m[1] in B.pruned)) B.pruned[m[1]] = now;
    const cap = document.querySelector('#arch-caption');
    if (cap) {
      const m = cap.innerText.match(/pruned at step (\d+)/);
      if (m && !(m[1] in B.caption)) B.caption[m[1]] = now;
    }
    const tb = document.querySelector('#jobs-table');
    if (B.watchTable && tb) {
      // a cell's textContent: Gradio 6's data rows have an empty innerText
      const rows = [...tb.querySelectorAll('tr')].map((tr) =>
        [...tr.querySelectorAll('td, th')].map((c) => c.textContent.trim()).join('\t'));
      const key = rows.join('\n');
      if (key !== B.lastTable) { B.lastTable = key; B.tables.push({t: now, rows}); }
    }
  }, 20);
})();
"""

# True (and B.done stamped) once the Monitor shows the job with this budget text, with the
# per-layer chart drawn for the snapshot the caption names.
SWITCH_DONE_JS = r"""
(budget) => {
  const B = window.__bench;
  const st = document.querySelector('#monitor-status');
  if (!st || !st.innerText.includes('(budget ' + budget + ')')) return false;
  const cap = document.querySelector('#arch-caption');
  const m = cap && cap.innerText.match(/· (\w+) at step (\d+)/);
  if (m) {
    const title = document.querySelector('#arch-plot .gtitle');
    if (!title || !title.textContent.startsWith(m[1] + ' · step ' + m[2])) return false;
  }
  if (B.done === null) B.done = Date.now();
  return true;
}
"""

TABLE_HAS_JS = r"""
(ids) => {
  const tb = document.querySelector('#jobs-table');
  if (!tb || tb.offsetParent === null) return false;
  const text = tb.innerText;
  if (!ids.every((i) => text.includes(i))) return false;
  const B = window.__bench;
  if (B.done === null) B.done = Date.now();
  return true;
}
"""


def stats(xs: list[float]) -> dict[str, Any]:
    """count, median, p95 (linear interpolation), max, mean; seconds."""
    xs = sorted(xs)
    if not xs:
        return {"count": 0, "median": None, "p95": None, "max": None, "mean": None}

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {
        "count": len(xs),
        "median": round(q(0.5), 3),
        "p95": round(q(0.95), 3),
        "max": round(xs[-1], 3),
        "mean": round(sum(xs) / len(xs), 3),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DbWatch(threading.Thread):
    """Polls the job DB read-only (plain sqlite3: the app's engine would take the write lock)
    and records when each pruned event row and each job step first became visible."""

    def __init__(self, path: Path, period_s: float = 0.05) -> None:
        super().__init__(daemon=True, name="db-watch")
        self.path, self.period_s = path, period_s
        self.jobs: set[str] = set()
        self.pruned: dict[tuple[str, int], dict[str, float]] = {}
        self.steps: dict[tuple[str, int], float] = {}
        self.status: dict[str, str] = {}
        self.budget: dict[str, int | None] = {}
        self._last_id = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def track(self, job_id: str) -> None:
        with self._lock:
            self.jobs.add(job_id)

    def run(self) -> None:
        conn = None
        while not self._halt.wait(self.period_s):
            try:
                if conn is None:
                    conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1)
                self._poll(conn)
            except sqlite3.Error:
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _poll(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            jobs = sorted(self.jobs)
        if not jobs:
            return
        marks = ",".join("?" * len(jobs))
        rows = conn.execute(
            f"SELECT id, job_id, step, payload FROM events WHERE id > ? AND type = 'pruned' "
            f"AND job_id IN ({marks}) ORDER BY id",
            [self._last_id, *jobs],
        ).fetchall()
        now = time.time()
        for row_id, job_id, step, payload in rows:
            self._last_id = max(self._last_id, row_id)
            emitted = json.loads(payload).get("time") if payload else None
            self.pruned.setdefault((job_id, int(step)), {"emitted": emitted, "db_seen": now})
        for job_id, step, status, budget in conn.execute(
            f"SELECT id, step, status, budget FROM jobs WHERE id IN ({marks})", jobs
        ):
            self.steps.setdefault((job_id, int(step or 0)), now)
            self.status[job_id], self.budget[job_id] = status, budget

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="ui-latency-"))
        self.data = self.tmp / "data"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.app: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.env: dict[str, str] = {}
        self.notes: list[str] = []

    # ---- processes ----------------------------------------------------------------------
    def setup_env(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
        env.update(
            EFFICIENTLLM_DATA=str(self.data),
            EFFICIENTLLM_USERS=f"{OWNER}:{PASSWORD},bob:pw-b",
            APP_ENV="test",
            FAULT_STEP_DELAY_S=str(self.args.step_delay),
            EFFICIENTLLM_EVENT_FLUSH_S="0.2",
            EFFICIENTLLM_HEARTBEAT_S="1",
            EFFICIENTLLM_LEASE_TTL_S="15",
            EFFICIENTLLM_TEST_THREADS="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        )
        self.env = env
        os.environ.clear()
        os.environ.update(env)  # worker.submit / celery in this process use the same broker

    def start_app(self) -> None:
        port = free_port()
        log = (self.tmp / "app.log").open("wb")
        self.app = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", str(port)], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(self.url + "/config", timeout=1)
                return
            except urllib.error.HTTPError:  # 401 before login: the app is up
                return
            except OSError:
                if self.app.poll() is not None:
                    raise RuntimeError((self.tmp / "app.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        raise RuntimeError("the app did not come up")

    def start_workers(self, n: int) -> None:
        for i in range(n):
            log = (self.tmp / f"worker{i}.log").open("wb")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker"],
                    cwd=ROOT,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
            log.close()

    def wait_workers_ready(self, timeout_s: float = 180) -> None:
        """Until every extra worker logged Celery's ``ready.``: their start (imports, pool fork)
        takes ~20 s of both cores, and part 1 used to run during it (its first pruning event
        then took 2.5-3 s to show, in runs of the old and of the new Monitor alike)."""
        deadline = time.time() + timeout_s
        logs = [self.tmp / f"worker{i}.log" for i in range(len(self.procs))]
        while time.time() < deadline:
            if all(b"ready." in p.read_bytes() for p in logs if p.exists()):
                time.sleep(2)  # the pool's fork and the reaper's start follow
                return
            time.sleep(0.5)
        self.notes.append(f"workers not all ready after {timeout_s:.0f} s")

    def stop_all(self) -> None:
        if self.app is not None and self.app.poll() is None:
            self.app.send_signal(signal.SIGINT)  # uvicorn stops; atexit stops its worker
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in [*self.procs, *([self.app] if self.app else [])]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    # ---- jobs ---------------------------------------------------------------------------
    def prepare_inputs(self) -> None:
        sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
        from tiny import save_tiny_source, tiny_text

        from app import forms

        self.src = save_tiny_source(self.tmp / "tiny-src")
        corpus = self.tmp / "corpus.jsonl"
        corpus.write_text(
            "".join(json.dumps({"text": tiny_text(100 + i, 30)}) + "\n" for i in range(6))
        )
        self.dataset = forms.save_upload(
            corpus, owner=OWNER, data_root=self.data.resolve(), max_bytes=2**30
        )

    def submit(self, name: str, budget: str, total_tokens: int | None = None) -> str:
        import db
        from app import forms
        from worker.submit import submit_job

        base = forms.preset_form("tiny-debug", forms.FormValues())
        values = forms.FormValues(
            **{
                **base.__dict__,
                "model": str(self.src),
                "budget": budget,
                "dataset": self.dataset,
                "total_tokens": total_tokens or base.total_tokens,
            }
        )
        config = forms.form_to_config(values, owner=OWNER, data_root=self.data.resolve())
        if not hasattr(self, "_sm"):
            self._sm = db.session_factory(db.make_engine(f"sqlite:///{self.db_path}"))
        with self._sm() as s:
            return submit_job(s, config=config, owner=OWNER, name=name)

    def cancel(self, job_id: str) -> None:
        from worker.submit import cancel_job

        with self._sm() as s:
            cancel_job(s, job_id=job_id, owner=OWNER)

    @property
    def db_path(self) -> Path:
        return (self.data / "efficientllm.db").resolve()

    # ---- browser helpers ----------------------------------------------------------------
    def watch_requests(self, page: Any) -> None:
        """Record the data of every Gradio queue request (the values the page sends)."""
        self.sent: list[list[Any]] = []

        def on_request(req: Any) -> None:
            if req.method == "POST" and "/queue/join" in req.url:
                with contextlib.suppress(Exception):
                    self.sent.append(list(json.loads(req.post_data or "{}").get("data") or []))

        page.on("request", on_request)

    def choices(self) -> list[tuple[str, str]]:
        """The Monitor dropdown's (label, value) choices, as the server builds them now."""
        from app import monitor
        from app.context import AppContext

        if not hasattr(self, "_ctx"):
            self._ctx = AppContext(sessions=self._sm, data_dir=self.data, users={OWNER: "x"},
                                   max_upload_bytes=1)  # fmt: skip
        return monitor.job_table(self._ctx, OWNER)[1]

    def choose_job(self, page: Any, job_id: str, timeout_s: float = 60) -> None:
        """Select the value ``job_id`` in the Monitor's job dropdown.

        The option to click is found by value: its index in the server's choices (the list the
        page shows once its jobs timer refreshed it, checked by the option count), and the
        selection counts only when the page sent ``job_id`` itself to the server (the recorded
        queue request), else it is retried; no label text is matched.
        """
        deadline = time.time() + timeout_s
        while True:
            values = [v for _, v in self.choices()]
            page.locator("#monitor-job input").click()
            try:
                if job_id not in values:
                    raise LookupError(f"{job_id} not submitted yet")
                page.wait_for_function(
                    "(n) => document.querySelectorAll(\"ul[role='listbox'] li[data-index]\")"
                    ".length === n", arg=len(values), timeout=4000,
                )  # fmt: skip
                page.evaluate("() => { window.__bench.click = null; window.__bench.done = null; }")
                n_sent = len(self.sent)
                i = values.index(job_id)
                page.locator(f"ul[role='listbox'] li[data-index='{i}']").click()
                t_sent = time.time() + 5
                while time.time() < t_sent and not any(job_id in d for d in self.sent[n_sent:]):
                    time.sleep(0.05)
                if any(job_id in d for d in self.sent[n_sent:]):
                    return
                raise LookupError("another value was sent")  # the list changed under the click
            except Exception:
                with contextlib.suppress(Exception):
                    page.keyboard.press("Escape")
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    @staticmethod
    def budget_text(watch: DbWatch, job_id: str, timeout_s: float = 60) -> str:
        """The budget as the Monitor's status line shows it, once known: the job's ``budget``
        column is NULL until its worker's ``started`` event, which comes seconds after the job
        became ``running`` when five start at once (expecting ``(budget ?)`` then was why part 2
        timed out: the page did show the chosen job)."""
        from app.plots import params_text

        deadline = time.time() + timeout_s
        while watch.budget.get(job_id) is None and time.time() < deadline:
            time.sleep(0.1)
        return params_text(watch.budget.get(job_id))

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from playwright.sync_api import sync_playwright

        a = self.args
        self.setup_env()
        self.data.mkdir(parents=True)
        t_start = time.time()
        watch = DbWatch(self.db_path)
        out: dict[str, Any] = {}
        try:
            self.start_app()  # migrates the DB and starts the embedded worker
            self.start_workers(a.workers - 1)
            self.prepare_inputs()
            self.wait_workers_ready()
            watch.start()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1300, "height": 900})
                page.set_default_timeout(60_000)
                page.add_init_script(INIT_JS)
                self.watch_requests(page)
                page.goto(self.url)
                page.get_by_label("username").fill(OWNER)
                page.get_by_label("password").fill(PASSWORD)
                page.get_by_role("button", name="Login").click()
                page.get_by_role("tab", name="New job").wait_for()
                t0 = time.time()
                browser_now = page.evaluate("Date.now()")
                t1 = time.time()
                out["clock_offset_ms"] = round(browser_now - (t0 + t1) * 500, 1)
                out["pruning"] = self.phase_pruning(page, watch)
                out["load"] = self.phase_load(page, watch)
                browser.close()
        finally:
            if watch.is_alive():
                watch.stop()
            self.stop_all()
        out["wall_s"] = round(time.time() - t_start, 1)
        out["notes"] = self.notes
        return out

    def phase_pruning(self, page: Any, watch: DbWatch) -> dict[str, Any]:
        a = self.args
        job = self.submit("prune-latency", "60%")
        watch.track(job)
        page.get_by_role("tab", name="Monitor").click()
        self.choose_job(page, job)
        page.locator("#monitor-status", has_text="budget").wait_for()
        picked_at = time.time()
        deadline = time.time() + a.job_timeout
        while time.time() < deadline and watch.status.get(job) not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(0.5)
        time.sleep(3)  # the last poll
        seen = page.evaluate("() => window.__bench")
        status = watch.status.get(job)
        rows, excluded = [], []
        for (jid, step), ref in sorted(watch.pruned.items()):
            if jid != job:
                continue
            b_log, b_cap = seen["pruned"].get(str(step)), seen["caption"].get(str(step))
            if ref["db_seen"] < picked_at:  # already in the DB when the Monitor loaded the job
                excluded.append(step)
                continue
            rows.append(
                {
                    "step": step,
                    "emitted": ref["emitted"],
                    "db_seen": ref["db_seen"],
                    "log_shown": b_log / 1000 if b_log else None,
                    "caption_shown": b_cap / 1000 if b_cap else None,
                }
            )
        missing = [r["step"] for r in rows if r["log_shown"] is None]

        def lat(key: str, ref: str) -> list[float]:
            return [r[key] - r[ref] for r in rows if r[key] and r[ref]]

        result = {
            "job_id": job,
            "job_status": status,
            "step_delay_s": a.step_delay,
            "reference": "event payload 'time' (the events table has no insert timestamp)",
            "emitted_to_log": stats(lat("log_shown", "emitted")),
            "db_seen_to_log": stats(lat("log_shown", "db_seen")),
            "emitted_to_db_seen": stats(lat("db_seen", "emitted")),
            "emitted_to_caption": stats(lat("caption_shown", "emitted")),
            "excluded_steps": excluded,
            "never_shown_steps": missing,
            "events": rows,
        }
        if status != "succeeded":
            self.notes.append(f"pruning job ended {status!r}")
        if missing:
            self.notes.append(f"pruned events never seen in the event log: steps {missing}")
        return result

    def phase_load(self, page: Any, watch: DbWatch) -> dict[str, Any]:
        a = self.args
        jobs = [self.submit(f"load-{i + 1}", b, a.load_tokens) for i, b in enumerate(LOAD_BUDGETS)]
        for j in jobs:
            watch.track(j)
        t_sub = time.time()
        deadline = t_sub + a.job_timeout
        while time.time() < deadline:
            running = [j for j in jobs if watch.status.get(j) == "running"]
            if len(running) == len(jobs):
                break
            time.sleep(0.5)
        running = [j for j in jobs if watch.status.get(j) == "running"]
        res: dict[str, Any] = {
            "jobs": jobs,
            "workers": a.workers,
            "running_at_start": len(running),
            "seconds_until_all_running": round(time.time() - t_sub, 1),
            "budgets_known_when_all_running": sum(watch.budget.get(j) is not None for j in jobs),
            "load_tokens": a.load_tokens,
        }
        if len(running) < len(jobs):
            self.notes.append(f"only {len(running)} of {len(jobs)} load jobs were running")

        # Monitor: switch between the running jobs through the job dropdown
        switches, t_phase = [], time.time()
        page.get_by_role("tab", name="Monitor").click()
        targets = [j for j in jobs if j in running] or jobs
        for i in range(a.switches):
            target = targets[(i + 1) % len(targets)]
            want = self.budget_text(watch, target)
            self.choose_job(page, target)
            try:
                page.wait_for_function(SWITCH_DONE_JS, arg=want, polling="raf", timeout=15_000)
            except Exception:
                seen = page.evaluate(
                    "() => [document.querySelector('#monitor-status')?.innerText,"
                    " document.querySelector('#arch-caption')?.innerText,"
                    " document.querySelector('#arch-plot .gtitle')?.textContent]"
                )
                self.notes.append(
                    f"switch to {target[:8]} (budget {want}) not seen in 15 s: {seen}"
                )
                res.setdefault("monitor_switch_timeouts", 0)
                res["monitor_switch_timeouts"] = res["monitor_switch_timeouts"] + 1
                continue
            b = page.evaluate("() => window.__bench")
            if b["click"] and b["done"]:
                switches.append((b["done"] - b["click"]) / 1000)
            time.sleep(0.3)
        res["monitor_switch"] = stats(switches)
        res["monitor_switch_all"] = switches

        # Jobs tab: open it from the Monitor tab
        ids = list(jobs)
        opens = []
        for _ in range(a.tab_opens):
            page.get_by_role("tab", name="Monitor").click()
            time.sleep(0.5)
            page.evaluate("() => { window.__bench.click = null; window.__bench.done = null; }")
            page.get_by_role("tab", name="Jobs").click()
            page.wait_for_function(TABLE_HAS_JS, arg=ids, polling="raf")
            b = page.evaluate("() => window.__bench")
            if b["click"] and b["done"]:
                opens.append((b["done"] - b["click"]) / 1000)
        res["jobs_tab_open"] = stats(opens)

        # Jobs tab freshness: DB step -> the table shows it (3 s refresh timer)
        page.evaluate("() => { window.__bench.watchTable = true; window.__bench.tables = []; }")
        time.sleep(a.freshness_s)
        tables = page.evaluate("() => window.__bench.tables")
        page.evaluate("() => { window.__bench.watchTable = false; }")
        fresh, shown = [], set()
        for snap in tables:
            for row in snap["rows"]:
                found = re.search(r"([0-9a-f]{32})", row)
                prog = re.search(r"\b(\d+)/(\d+)\b", row)
                if not found or not prog or found[1] not in jobs:
                    continue
                key = (found[1], int(prog[1]))
                if key in shown:
                    continue
                shown.add(key)
                db_t = watch.steps.get(key)
                if db_t is not None and snap is not tables[0]:
                    fresh.append(snap["t"] / 1000 - db_t)
        res["jobs_tab_freshness"] = stats(fresh)
        res["jobs_tab_table_updates"] = len(tables)
        res["jobs_tab_table_update_times"] = [
            round(x["t"] / 1000 - tables[0]["t"] / 1000, 3) for x in tables
        ]

        # Page reload -> Jobs tab -> table with the five jobs
        reloads = []
        for _ in range(a.reloads):
            t0 = time.time()
            page.reload()
            page.get_by_role("tab", name="Jobs").click()
            page.wait_for_function(TABLE_HAS_JS, arg=ids, polling="raf")
            reloads.append(time.time() - t0)
        res["reload_to_jobs_table"] = stats(reloads)
        still = [j for j in jobs if watch.status.get(j) == "running"]
        res["running_at_end"] = len(still)
        res["measure_s"] = round(time.time() - t_phase, 1)
        if len(still) < len(jobs):
            self.notes.append(f"only {len(still)} load jobs were still running at the end")
        res["loadavg_end"] = os.getloadavg()
        for j in jobs:
            self.cancel(j)
        deadline = time.time() + 30
        while time.time() < deadline and any(watch.status.get(j) == "running" for j in jobs):
            time.sleep(0.5)
        return res


def fmt(s: dict[str, Any], unit: float = 1.0) -> list[str]:
    if not s["count"]:
        return ["0", "-", "-", "-"]
    return [str(s["count"])] + [f"{s[k] * unit:.2f}" for k in ("median", "p95", "max")]


def markdown(out: dict[str, Any]) -> str:
    p, ld = out["pruning"], out["load"]
    rows = [
        ("Pruned event (payload time) -> Monitor event log", p["emitted_to_log"], "1 running"),
        ("Pruned event -> architecture caption", p["emitted_to_caption"], "1 running"),
        ("Pruned row visible in DB (50 ms poll) -> event log", p["db_seen_to_log"], "1 running"),
        ("Pruned event time -> row visible in DB", p["emitted_to_db_seen"], "1 running"),
        ("Monitor job switch (dropdown click -> charts)", ld["monitor_switch"], "5 running"),
        ("Jobs tab open (tab click -> table)", ld["jobs_tab_open"], "5 running"),
        ("Jobs tab freshness (DB step -> table)", ld["jobs_tab_freshness"], "5 running"),
        ("Page reload -> Jobs table", ld["reload_to_jobs_table"], "5 running"),
    ]
    lines = [
        "| measurement | load | n | median s | p95 s | max s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, s, load in rows:
        lines.append("| " + " | ".join([name, load, *fmt(s)]) + " |")
    goal = p["emitted_to_log"]["p95"]
    verdict = "met" if goal is not None and goal <= GOAL_P95_S else "NOT met"
    lines.append("")
    lines.append(f"Goal p95 <= {GOAL_P95_S:.0f} s for pruned event -> Monitor: **{verdict}**.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step-delay", type=float, default=1.0, help="FAULT_STEP_DELAY_S")
    parser.add_argument("--workers", type=int, default=5, help="workers incl. the embedded one")
    parser.add_argument("--load-tokens", type=int, default=32 * 4 * 150, help="load jobs' tokens")
    parser.add_argument("--switches", type=int, default=15)
    parser.add_argument("--tab-opens", type=int, default=5)
    parser.add_argument("--freshness-s", type=float, default=20.0)
    parser.add_argument("--reloads", type=int, default=4)
    parser.add_argument("--job-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ui_latency.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir and logs")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        sys.exit(f"needs {CHROMIUM}")
    bench = Bench(args)
    try:
        out = bench.run()
    finally:
        if args.keep:
            print(f"kept {bench.tmp}")
        else:
            shutil.rmtree(bench.tmp, ignore_errors=True)
    out["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    out["command"] = "python bench/ui_latency.py " + " ".join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(out))
    print()
    print(f"clock offset browser - python: {out['clock_offset_ms']} ms; wall {out['wall_s']} s")
    for note in out["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
