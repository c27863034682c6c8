"""The Playground tab: generate text from a succeeded job's exported model.

The web process never loads the model (nor torch): *Generate* validates the input and sends
``efficientllm.generate`` to the job's queue (``worker.submit.submit_generation``); a 1 s
``gr.Timer``, active only while a generation is pending, polls its row until it finishes.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import gradio as gr

from app.context import AppContext
from app.guard import guarded
from db import repo
from db.models import utcnow

log = logging.getLogger(__name__)
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_TEMPERATURE = 0.7
GIVE_UP_AFTER = timedelta(minutes=30)
"""Stop polling a generation still pending this long after it was queued (the worker may be
busy with a long training job; the row keeps its status and can be polled again)."""


def succeeded_choices(choices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (label, id) job choices of ``monitor.job_table`` whose job has succeeded."""
    return [c for c in choices if c[0].endswith("· succeeded")]


def generation_view(gen: Any) -> tuple[str, str | None, bool]:
    """(status message, output or None to leave it, still pending) for a generation row."""
    waited = (utcnow() - gen.created_at).total_seconds() if gen.created_at else 0.0
    if gen.status == "queued":
        if waited > GIVE_UP_AFTER.total_seconds():
            return "**queued** for a long time; the worker is busy. Try again later.", None, False
        return f"**queued** ({waited:.0f} s); the worker ends its current job first.", None, True
    if gen.status == "running":
        return f"**running** ({waited:.0f} s): loading the model and generating.", None, True
    if gen.status == "failed":
        return f"**failed:** {gen.error_message or 'unknown error'}", "", False
    took = (gen.finished_at - gen.created_at).total_seconds() if gen.finished_at else waited
    text = gen.output or ""
    note = "" if text.strip() else " The model produced only whitespace (or nothing)."
    return f"**succeeded** in {took:.1f} s.{note}", text, False


def build(ctx: AppContext) -> gr.Dropdown:
    """The tab's widgets and events, inside the current ``gr.Tab``; returns the job picker
    (its choices follow the jobs list: see :func:`succeeded_choices`)."""
    with gr.Row():
        job = gr.Dropdown([], label="Succeeded job", elem_id="play-job")
        max_new = gr.Slider(
            1, 256, DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens", elem_id="play-max"
        )
        temperature = gr.Slider(
            0.0, 2.0, DEFAULT_TEMPERATURE, step=0.05, label="Temperature (0 = greedy)",
            elem_id="play-temperature",
        )  # fmt: skip
    prompt = gr.Textbox("", label="Prompt", lines=4, max_length=2000, elem_id="play-prompt")
    generate_btn = gr.Button("Generate", variant="primary", elem_id="play-generate")
    msg = gr.Markdown(elem_id="play-msg")
    output = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="play-output")
    pending = gr.State(None)
    timer = gr.Timer(1.0, active=False)

    def owner_of(request: gr.Request) -> str:
        return ctx.owner(getattr(request, "username", None))

    @guarded(4)
    def on_generate(
        job_id: str | None, text: str, n: float, temp: float, request: gr.Request
    ) -> tuple[Any, ...]:
        from worker.submit import submit_generation

        with ctx.session() as s:
            gen_id = submit_generation(
                s,
                job_id=job_id or "",
                owner=owner_of(request),
                prompt=text or "",
                max_new_tokens=n,
                temperature=temp,
            )
        return "**queued**", "", gen_id, gr.Timer(active=True)

    @guarded(4)
    def on_poll(gen_id: str | None, request: gr.Request) -> tuple[Any, ...]:
        if not gen_id:
            return gr.skip(), gr.skip(), None, gr.Timer(active=False)
        with ctx.session() as s:
            gen = repo.get_generation(s, gen_id=gen_id, owner=owner_of(request))
            if gen is None:
                return "This generation no longer exists.", "", None, gr.Timer(active=False)
            text, out, more = generation_view(gen)
        if more:
            return text, gr.skip(), gr.skip(), gr.skip()
        return text, gr.skip() if out is None else out, None, gr.Timer(active=False)

    generate_btn.click(
        on_generate, [job, prompt, max_new, temperature], [msg, output, pending, timer]
    )
    timer.tick(on_poll, [pending], [msg, output, pending, timer], show_progress="hidden")
    return job
