"""Gradio Blocks: the layout of new job, jobs list, monitor (with results), compare and the
playground, and the wiring of their events to :class:`app.handlers.Handlers`.

The callbacks live in :mod:`app.handlers` (errors shown by :func:`app.guard.guarded`); this
module only builds widgets. All state comes from the DB, so a page refresh or a server restart
loses nothing.
"""

from __future__ import annotations

import functools
import html
from typing import Any

import gradio as gr

from app import forms, monitor, playground
from app.context import AppContext
from app.handlers import MONITOR_OUTPUTS, Handlers
from efficientllm.choices import GRANULARITIES, SCORERS
from efficientllm.presets import preset_names

JOB_COLUMNS = ["name", "id", "status", "phase", "progress", "params / budget", "ETA", "owner"]
ADVANCED_LABELS = {
    "start_fraction": "Stabilisation share (tokens before pruning)",
    "trajectory": "Size trajectory",
    "lr_schedule": "Learning-rate schedule",
    "saliency_mode": "Saliency averaging",
    "saliency_beta": "Saliency EMA beta",
    "distill_weight": "Distillation weight (0 = off)",
    "distill_temperature": "Distillation temperature",
    "distill_phases": "Distill during",
    "distill_teacher": "Teacher model (empty = the source)",
    "gguf": "GGUF file for llama.cpp",
}
"""Labels of the :data:`forms.ADVANCED` widgets (each also shows its config field's name)."""


def markdown_literal(text: str) -> str:
    """``text`` for a widget's info line, which Gradio renders as Markdown without honouring
    backslash escapes: ``*`` in formulas becomes the look-alike U+2217, not italics."""
    return text.replace("*", "\N{ASTERISK OPERATOR}")


def _field_kw(widget: str, defaults: forms.FormValues) -> dict[str, Any]:
    """Value, label, info (the config field's docstring) and elem_id of an Advanced widget."""
    section, key = forms.ADVANCED[widget]
    return {
        "value": getattr(defaults, widget),
        "label": f"{ADVANCED_LABELS[widget]} · {section}.{key}",
        "info": markdown_literal(forms.config_help(section, key)),
        "elem_id": widget.replace("_", "-"),
    }


def advanced_widgets(defaults: forms.FormValues) -> dict[str, Any]:
    """The :data:`forms.ADVANCED` widgets, in rows inside the current block, by widget name."""
    kw = functools.partial(_field_kw, defaults=defaults)

    def choice(widget: str) -> gr.Radio:
        return gr.Radio(forms.config_choices(*forms.ADVANCED[widget]), **kw(widget))

    w: dict[str, Any] = {}
    with gr.Row():
        w["start_fraction"] = gr.Slider(0.0, 0.95, step=0.05, **kw("start_fraction"))
        w["trajectory"] = choice("trajectory")
        w["lr_schedule"] = choice("lr_schedule")
    with gr.Row():
        w["saliency_mode"] = choice("saliency_mode")
        w["saliency_beta"] = gr.Number(**kw("saliency_beta"))
    with gr.Row():
        w["distill_weight"] = gr.Slider(0.0, 1.0, step=0.05, **kw("distill_weight"))
        w["distill_temperature"] = gr.Number(**kw("distill_temperature"))
    with gr.Row():
        w["distill_phases"] = choice("distill_phases")
        w["distill_teacher"] = gr.Textbox(**kw("distill_teacher"))
    with gr.Row():
        w["gguf"] = choice("gguf")
    return w


def signed_in(request: gr.Request) -> str:
    """The header line with login on: who is signed in, and the way out."""
    user = html.escape(getattr(request, "username", None) or "?")
    return f'Signed in as <b>{user}</b> · <a href="/logout" target="_self">Log out</a>'


def build(ctx: AppContext) -> gr.Blocks:
    """The whole UI."""
    defaults = forms.FormValues()
    with gr.Blocks(title="EfficientLLM") as ui:
        state = gr.State(None)
        if ctx.users:  # login on: name the user and offer the logout (app.login)
            whoami = gr.HTML(elem_id="whoami")  # HTML: Markdown links open a new tab
            ui.load(signed_in, None, whoami)
        with gr.Tabs() as tabs:
            with gr.Tab("New job", id="new"):
                with gr.Row():
                    preset = gr.Dropdown(
                        preset_names(), value=defaults.preset, label="Preset", elem_id="preset"
                    )
                    model = gr.Dropdown(
                        forms.KNOWN_MODELS,
                        value=defaults.model,
                        label="Source model",
                        allow_custom_value=True,
                        elem_id="model",
                    )
                    budget = gr.Textbox(
                        defaults.budget, label="Budget (67M, 0.5B or 50%)", elem_id="budget"
                    )
                with gr.Row():
                    dataset = gr.Dropdown(
                        [forms.DEMO_DATA],
                        value=defaults.dataset,
                        label="Dataset",
                        allow_custom_value=True,
                        elem_id="dataset",
                    )
                    upload = gr.File(
                        label="Upload .txt / .jsonl / .parquet",
                        elem_id="upload",
                        file_types=list(forms.UPLOAD_SUFFIXES),
                    )
                with gr.Accordion("Advanced", open=False):
                    tokens = gr.Number(defaults.total_tokens, label="Total tokens", precision=0)
                    fraction = gr.Slider(
                        0.05,
                        1.0,
                        defaults.prune_fraction,
                        step=0.05,
                        label="Prune fraction (share of tokens)",
                    )
                    granularity = gr.Radio(
                        list(GRANULARITIES), value=defaults.granularity, label="Granularity"
                    )
                    scorer = gr.Dropdown(list(SCORERS), value=defaults.scorer, label="Saliency")
                    advanced = advanced_widgets(defaults)
                name = gr.Textbox("", label="Job name", elem_id="job-name")
                with gr.Row():
                    predict_btn = gr.Button("Predict architecture", elem_id="predict")
                    launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
                new_msg = gr.Markdown(elem_id="new-msg")
                predicted = gr.Plot(label="Predicted architecture", elem_id="predicted-plot")
            with gr.Tab("Jobs", id="jobs"):
                jobs = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, elem_id="jobs-table")
            with gr.Tab("Monitor", id="monitor"):
                with gr.Row():
                    pick = gr.Dropdown([], label="Job", elem_id="monitor-job")
                    cancel_btn = gr.Button("Cancel job", variant="stop", elem_id="cancel")
                status = gr.Markdown(elem_id="monitor-status")
                arch = gr.Plot(label="Architecture per layer", elem_id="arch-plot")
                scrub = gr.Slider(0, 1, 0, step=1, label="Pruning event", elem_id="arch-slider")
                caption = gr.Markdown(elem_id="arch-caption")
                with gr.Row():
                    params_plot = gr.Plot(label="Parameters")
                    loss_plot = gr.Plot(label="Loss and perplexity")
                sal_plot = gr.Plot(label="Pruned fraction and saliency")
                events = gr.Textbox(label="Event log", lines=10, max_lines=10, elem_id="event-log")
                gr.Markdown("### Results")
                ppl_md = gr.Markdown(elem_id="results-ppl")
                download = gr.HTML(elem_id="download")
                table = gr.Dataframe(
                    headers=["layer", "query heads", "KV heads", "FFN width"],
                    interactive=False,
                    elem_id="final-shape",
                )
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    job_a, job_b = gr.Dropdown([], label="Job A"), gr.Dropdown([], label="Job B")
                compare_msg = gr.Markdown()
                compare_plot = gr.Plot(label="Final architectures")
            with gr.Tab("Playground", id="playground"):
                play_job = playground.build(ctx)
        monitor_timer, jobs_timer = gr.Timer(monitor.TICK_S), gr.Timer(3.0)

        widgets = {"preset": preset, "model": model, "budget": budget, "dataset": dataset,
                   "total_tokens": tokens, "prune_fraction": fraction,
                   "granularity": granularity, "scorer": scorer, **advanced}  # fmt: skip
        form = [widgets[w] for w in forms.FIELD_ORDER]
        monitor_widgets = {"status": status, "arch": arch, "scrub": scrub, "caption": caption,
                           "params_plot": params_plot, "loss_plot": loss_plot, "sal_plot": sal_plot,
                           "events": events, "table": table, "ppl_md": ppl_md,
                           "download": download}  # fmt: skip
        monitor_out = [monitor_widgets[w] for w in MONITOR_OUTPUTS]
        h = Handlers(ctx)

        preset.input(h.on_preset, form, form)
        upload.upload(h.on_upload, [upload], [new_msg, dataset])
        predict_btn.click(h.on_predict, form, [new_msg, predicted])
        launch_btn.click(h.on_launch, [name, *form], [new_msg, predicted, pick, state, tabs]).then(
            h.on_pick, [pick], [*monitor_out, state]
        )
        pick.input(h.on_pick, [pick], [*monitor_out, state])
        scrub.input(h.on_scrub, [state, scrub], [arch, caption])
        monitor_timer.tick(h.on_tick, [state], [*monitor_out, state], show_progress="hidden")
        cancel_btn.click(h.on_cancel, [state], [status])
        jobs_seen = gr.State(None)
        jobs_out = [jobs, pick, job_a, job_b, play_job, jobs_seen]
        jobs_timer.tick(h.on_jobs, [jobs_seen], jobs_out, show_progress="hidden")
        ui.load(h.on_jobs, [jobs_seen], jobs_out)
        job_b.input(h.on_compare, [job_a, job_b], [compare_msg, compare_plot])
        job_a.input(h.on_compare, [job_a, job_b], [compare_msg, compare_plot])
    ui.queue(max_size=ctx.queue_max_size)  # a flood is refused (503), not queued without end
    return ui
