"""Monitor state: what one browser session knows about one job, advanced with a cursor.

``load`` reads a job's history once (metrics, evals, architecture snapshots from their tables;
the event log paged to its end); ``advance`` then folds only the events after the cursor. The
state is a plain dict (a ``gr.State``).

The page polls every :data:`TICK_S` so that a pruning event shows within a second, but most
ticks only peek (:mod:`app.news`: "did the status change, or is there an event other than a
step past my cursor?", answered from a per-job mark that all tabs share, so the DB sees at most
one small query per watched job and tick). The full read (job row, queue position, new events,
and the charts the caller redraws) runs when the peek says so or every :data:`FULL_REFRESH_S`;
steps arrive several times a second and are drawn at that slower pace.

The state also counts, per part (:data:`REVS`), how often the folded events changed it
(``state["rev"]``), so that a tick redraws only the charts whose data changed
(:func:`app.handlers.Handlers.on_tick`): a step touches the loss and size charts, a pruning event
the per-layer chart and the saliency chart as well.
"""

from __future__ import annotations

import html
import logging
import math
import time
from typing import Any

from app import news, plots
from app.context import AppContext
from db import repo
from db.snapshot import Snapshot, fold_snapshots, snapshot_from_row, snapshot_of

log = logging.getLogger(__name__)
LOG_LINES = 200
PAGE = 500
TICK_S = 0.25
"""The Monitor's ``gr.Timer`` period: each tick is a :func:`peek` unless a full read is due."""
FULL_REFRESH_S = 1.0
"""A full read at least this often (steps, ETA and queue position carry no peeked signal)."""
REVS = ("metrics", "evals", "snaps", "log", "export")
"""The parts of a state :func:`fold` counts changes of: a chart is redrawn when its count moved."""


def bump(state: dict[str, Any], part: str) -> None:
    """Count one change of ``part`` (one of :data:`REVS`) in ``state["rev"]``."""
    rev = state.setdefault("rev", dict.fromkeys(REVS, 0))
    rev[part] = rev.get(part, 0) + 1


def job_info(job: Any, position: int | None = None) -> dict[str, Any]:
    """The job row fields the UI shows."""
    return {
        "id": job.id,
        "name": job.name,
        "owner": job.owner,
        "status": job.status,
        "phase": job.phase,
        "step": job.step,
        "total_steps": job.total_steps,
        "params": job.params,
        "budget": job.budget,
        "source_params": job.source_params,
        "eta": job.eta_seconds,
        "error": job.error_message,
        "position": position,
        "created": job.created_at.strftime("%Y-%m-%d %H:%M:%S") if job.created_at else "",
    }


def log_line(e: dict[str, Any]) -> str | None:
    """One human line for an event (None for per-step noise)."""
    kind, step = e.get("type"), e.get("step", 0)
    if kind == "started":
        resumed = e.get("resumed_from")
        extra = f", resumed from step {resumed}" if resumed is not None else ""
        if (procs := e.get("num_processes") or 1) > 1:
            extra += f", {procs} processes"
        return f"step {step}: started ({e.get('source_params', 0):,} params{extra})"
    if kind == "pruned":
        removed = ", ".join(f"{v} {k}" for k, v in (e.get("removed") or {}).items())
        return f"step {step}: pruned {removed} -> {e.get('params_after', 0):,} params"
    if kind == "eval":
        return f"step {step}: {e.get('label')} perplexity {e.get('ppl', float('nan')):.2f}"
    if kind == "phase":
        return f"step {step}: phase {e.get('phase')}"
    if kind == "checkpoint":
        return f"step {step}: checkpoint saved"
    if kind in ("exported", "finished", "stopped"):
        return f"step {step}: {kind} {e.get('reason', '')}".rstrip()
    if kind == "failed":
        return f"step {step}: failed: {e.get('error', '')}"
    return None


def fold(state: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    """Apply new event payloads to ``state``; True if a chart needs redrawing (which ones:
    the parts counted in ``state["rev"]``).

    Architecture snapshots follow :func:`db.snapshot.fold_snapshots`, the rule the DB's rows
    follow, so a reloaded page shows the snapshots it showed live.
    """
    changed = False
    carrying: list[dict[str, Any]] = []
    for e in events:
        kind = e.get("type")
        line = log_line(e)
        if line:
            state["log"].append(line)
            bump(state, "log")
        if kind == "step":
            state["metrics"].append(
                {k: e.get(k) for k in ("step", "tokens", "loss", "params", "target_params")}
            )
            bump(state, "metrics")
        elif kind == "eval":
            state["evals"].append({k: e.get(k) for k in ("step", "tokens", "ppl", "label")})
            bump(state, "evals")
        elif snapshot_of(e) is not None:
            carrying.append(e)
        elif kind == "exported":
            note_export(state, e)
            bump(state, "export")
            continue
        else:
            continue
        changed = True
    if fold_snapshots(state["snaps"], carrying):
        bump(state, "snaps")
    if state["source"] is None:
        state["source"] = source_shape(state["snaps"])
    del state["log"][:-LOG_LINES]
    return changed


def note_export(state: dict[str, Any], e: dict[str, Any]) -> None:
    """Remember from an ``exported`` event whether a GGUF file was written (and if not, why)."""
    state["gguf"] = bool(e.get("gguf"))
    state["gguf_note"] = e.get("gguf_note")


def source_shape(snaps: list[Snapshot]) -> dict[str, Any] | None:
    """The source's shape among ``snaps`` (None before the job announced it)."""
    return next((x["shape"] for x in snaps if x["kind"] == "source"), None)


def load(ctx: AppContext, *, job_id: str, owner: str) -> dict[str, Any] | None:
    """The full state of ``owner``'s job (None if not found or not owned)."""
    with ctx.session() as s:
        job = repo.get_job(s, job_id=job_id, owner=owner)
        if job is None:
            return None
        snaps = [snapshot_from_row(x) for x in repo.snapshots(s, job_id=job_id)]
        points = repo.metrics(s, job_id=job_id)
        evals = repo.evals(s, job_id=job_id)
        state: dict[str, Any] = {
            "job_id": job_id,
            "cursor": 0,
            "read_at": time.monotonic(),
            "job": job_info(job),
            "snaps": snaps,
            "source": source_shape(snaps),
            "metrics": [
                {
                    "step": p.step,
                    "tokens": p.tokens,
                    "loss": p.loss,
                    "params": p.params,
                    "target_params": p.target_params,
                }
                for p in points
            ],
            "evals": [
                {"step": v.step, "tokens": v.tokens, "ppl": v.ppl, "label": v.label} for v in evals
            ],
            "log": [],
            "rev": dict.fromkeys(REVS, 0),
            "gguf": False,
            "gguf_note": None,
        }
        while True:
            rows = repo.events_after(s, job_id=job_id, cursor=state["cursor"], limit=PAGE)
            for row in rows:
                if row.payload.get("type") == "exported":
                    note_export(state, row.payload)
                line = log_line(row.payload)
                if line:
                    state["log"].append(line)
            del state["log"][:-LOG_LINES]
            if rows:
                state["cursor"] = rows[-1].seq
            if len(rows) < PAGE:
                break
    return state


def advance(
    ctx: AppContext, state: dict[str, Any], *, owner: str, now: float | None = None
) -> bool:
    """One poll: a peek (:func:`app.news.has_news`), then, when it says so or a full read is
    due, the job row and the events after the cursor. True if anything changed. ``now`` is a
    ``time.monotonic()``."""
    now = time.monotonic() if now is None else now
    read_at = state.get("read_at", -math.inf)
    if now - read_at < FULL_REFRESH_S and not news.has_news(
        ctx,
        job_id=state["job_id"],
        owner=owner,
        status=state["job"]["status"],
        cursor=state["cursor"],
        read_at=read_at,
        now=now,
    ):
        return False
    state["read_at"] = now
    with ctx.session() as s:
        job = repo.get_job(s, job_id=state["job_id"], owner=owner)
        if job is None:
            return False
        info = job_info(
            job, repo.queue_position(s, job_id=job.id) if job.status == "queued" else None
        )
        rows = repo.events_after(s, job_id=state["job_id"], cursor=state["cursor"], limit=PAGE)
    changed = info != state["job"]
    state["job"] = info
    if rows:
        state["cursor"] = rows[-1].seq
        fold(state, [r.payload for r in rows])
        changed = True
    return changed


# ---- presentation of the state -----------------------------------------------------------
def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _job_row(j: dict[str, Any]) -> list[Any]:
    status = j["status"] + (f" (#{j['position']} in queue)" if j.get("position") else "")
    progress = f"{j['step']}/{j['total_steps']}" if j.get("total_steps") else f"{j['step']}"
    sizes = f"{plots.params_text(j['params'])} / {plots.params_text(j['budget'])}"
    return [
        j["name"],
        j["id"],
        status,
        j["phase"] or "",
        progress,
        sizes,
        _eta(j["eta"]),
        j["owner"],
    ]


def job_table(ctx: AppContext, owner: str) -> tuple[list[list[Any]], list[tuple[str, str]]]:
    """Rows for the jobs list and (label, id) choices for the job pickers."""
    with ctx.session() as s:
        infos = []
        for job in repo.list_jobs(s, owner=owner, limit=200):
            pos = repo.queue_position(s, job_id=job.id) if job.status == "queued" else None
            infos.append(job_info(job, pos))
    choices = [(f"{j['name'] or 'job'} · {j['id'][:8]} · {j['status']}", j["id"]) for j in infos]
    return [_job_row(j) for j in infos], choices


def status_text(j: dict[str, Any]) -> str:
    """The status line above the monitor charts."""
    parts = [f"**{j['status']}**"]
    if j.get("position"):
        parts.append(f"position {j['position']} in the queue")
    if j.get("phase"):
        parts.append(f"phase {j['phase']}")
    if j.get("total_steps"):
        parts.append(f"step {j['step']} of {j['total_steps']}")
    parts.append(
        f"{plots.params_text(j['params'])} params (budget {plots.params_text(j['budget'])})"
    )
    if j.get("eta") and j["status"] == "running":
        parts.append(f"ETA {_eta(j['eta'])}")
    text = " · ".join(parts)
    if j["status"] == "failed" and j.get("error"):
        text += f"\n\n**Error:** {j['error']}"
    return text


def arch_view(state: dict[str, Any] | None, index: int | None) -> tuple[Any, str]:
    """The per-layer chart and its caption for snapshot ``index`` (default: the newest)."""
    snaps = (state or {}).get("snaps") or []
    if not snaps:
        return None, "No architecture yet: the job has not started."
    i = len(snaps) - 1 if index is None else max(0, min(int(index), len(snaps) - 1))
    snap = snaps[i]
    title = f"{snap['kind']} · step {snap['step']}"
    source = (state or {}).get("source")
    fig = plots.arch_figure(snap["shape"], source, title=title, params=snap["params"])
    caption = (
        f"snapshot {i + 1} of {len(snaps)} · {snap['kind']} at step {snap['step']} "
        f"({snap['tokens']:,} tokens) · {snap['params'] or 0:,} params"
    )
    return fig, caption


def results(state: dict[str, Any]) -> tuple[list[list[Any]], str, str]:
    """Final shape table, perplexities and the download link (empty until it succeeded)."""
    if state["job"]["status"] != "succeeded" or not state["snaps"]:
        return [], "", ""
    rows = plots.shape_rows(state["snaps"][-1]["shape"], state["source"])
    ppl = {e["label"]: e["ppl"] for e in state["evals"]}
    line = " · ".join(
        f"{label}: {ppl[label]:.2f}"
        for label in ("start", "after_pruning", "final")
        if ppl.get(label)
    )
    href = f"/api/jobs/{state['job_id']}/artifact"
    links = [
        f'<a id="download-link" href="{href}" download>Download the export '
        "(.zip: safetensors for transformers)</a>"
    ]
    if state.get("gguf"):
        links.append(
            f'<a id="download-gguf" href="{href}?format=gguf" download>Download the GGUF file '
            "(llama.cpp, Ollama, LM Studio)</a>"
        )
    elif state.get("gguf_note"):
        links.append(f'<span id="gguf-note">No GGUF file: {html.escape(state["gguf_note"])}</span>')
    return rows, f"**Validation perplexity** {line}", " &nbsp;·&nbsp; ".join(links)
