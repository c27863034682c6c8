"""Gradio Blocks: new job, jobs list, monitor (with results), compare and the playground.

Every handler is wrapped by :func:`guarded`: an ``EfficientLLMError`` becomes its message in
the UI, anything else a generic message (the traceback goes to the server log only). All state
comes from the DB, so a page refresh or a server restart loses nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gradio as gr

from app import forms, monitor, playground, plots
from efficientllm.errors import EfficientLLMError
from efficientllm.presets import preset_names

if TYPE_CHECKING:
    from app.main import AppContext

log = logging.getLogger(__name__)
GENERIC = "Something went wrong on the server; the details are in the server log."
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
}
"""Labels of the :data:`forms.ADVANCED` widgets (each also shows its config field's name)."""


def guarded(n_outputs: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Show errors as the first output (a message); the other outputs stay unchanged."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except EfficientLLMError as err:
                msg = f"**Cannot do that:** {err}"
            except Exception:
                log.exception("handler %s failed", fn.__name__)
                msg = f"**Error:** {GENERIC}"
            return (msg, *[gr.skip()] * (n_outputs - 1)) if n_outputs > 1 else msg

        return inner

    return wrap


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
    return w


def build(ctx: AppContext) -> gr.Blocks:
    """The whole UI."""
    defaults = forms.FormValues()
    with gr.Blocks(title="EfficientLLM") as ui:
        state = gr.State(None)
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
                        forms.GRANULARITIES, value=defaults.granularity, label="Granularity"
                    )
                    scorer = gr.Dropdown(forms.SCORERS, value=defaults.scorer, label="Saliency")
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
        monitor_timer, jobs_timer = gr.Timer(1.0), gr.Timer(3.0)

        widgets = {"preset": preset, "model": model, "budget": budget, "dataset": dataset,
                   "total_tokens": tokens, "prune_fraction": fraction,
                   "granularity": granularity, "scorer": scorer, **advanced}  # fmt: skip
        form = [widgets[w] for w in forms.FIELD_ORDER]
        monitor_out = [
            status,
            arch,
            scrub,
            caption,
            params_plot,
            loss_plot,
            sal_plot,
            events,
            table,
            ppl_md,
            download,
        ]

        def owner_of(request: gr.Request) -> str:
            return ctx.owner(getattr(request, "username", None))

        def values_of(*values: Any) -> forms.FormValues:
            return forms.FormValues(**dict(zip(forms.FIELD_ORDER, values, strict=True)))

        def config_of(values: forms.FormValues, request: gr.Request) -> dict[str, Any]:
            return forms.form_to_config(values, owner=owner_of(request), data_root=ctx.data_dir)

        def render(st: dict[str, Any]) -> list[Any]:
            fig, cap = monitor.arch_view(st, None)
            n = max(len(st["snaps"]) - 1, 0)
            evals = [e for e in st["evals"] if e.get("ppl") is not None]
            sal = [s for s in st["snaps"] if s["kind"] == "pruned"]
            rows, ppl, link = monitor.results(st)
            return [
                monitor.status_text(st["job"]),
                fig,
                gr.Slider(maximum=max(n, 1), value=n),
                cap,
                plots.params_figure(st["metrics"]),
                plots.loss_figure(st["metrics"], evals),
                plots.saliency_figure(sal, st["source"]),
                "\n".join(reversed(st["log"][-100:])),
                rows,
                ppl,
                link,
            ]

        @guarded(len(form))
        def on_preset(*values: Any) -> list[Any]:
            return forms.preset_form(values[0], values_of(*values)).as_list()

        @guarded(2)
        def on_upload(file: Any, request: gr.Request) -> tuple[str, Any]:
            if file is None:
                return "", gr.skip()
            path = getattr(file, "name", file)
            ds = forms.save_upload(
                path,
                owner=owner_of(request),
                data_root=ctx.data_dir,
                max_bytes=ctx.max_upload_bytes,
            )
            return f"Uploaded as `{ds}`.", gr.Dropdown(choices=[forms.DEMO_DATA, ds], value=ds)

        @guarded(2)
        def on_predict(request: gr.Request, *values: Any) -> tuple[str, Any]:
            p = forms.predict(config_of(values_of(*values), request))
            msg = (
                f"**Predicted:** {p.num_params:,} parameters ({plots.params_text(p.num_params)}) "
                f"for a budget of {p.budget:,}; source {p.source.num_params():,}. "
                + " ".join(p.notes)
            )
            return msg, plots.arch_figure(
                p.shape.to_dict(), p.source.to_dict(), title="predicted", params=p.num_params
            )

        @guarded(5)
        def on_launch(request: gr.Request, job_name: str, *values: Any) -> tuple[Any, ...]:
            config = config_of(values_of(*values), request)
            p = forms.predict(config)  # unknown model, budget above the source: nothing queued
            from worker.submit import submit_job

            owner = owner_of(request)
            with ctx.session() as s:
                job_id = submit_job(
                    s, config=config, owner=owner, name=job_name.strip() or "job", queue=ctx.queue
                )
            fig = plots.arch_figure(
                p.shape.to_dict(), p.source.to_dict(), title="predicted", params=p.num_params
            )
            _, choices = monitor.job_table(ctx, owner)
            msg = f"Queued job `{job_id}` ({plots.params_text(p.num_params)} predicted)."
            st = monitor.load(ctx, job_id=job_id, owner=owner)
            return (
                msg,
                fig,
                gr.Dropdown(choices=choices, value=job_id),
                st,
                gr.Tabs(selected="monitor"),
            )

        @guarded(len(monitor_out) + 1)
        def on_pick(job_id: str | None, request: gr.Request) -> list[Any]:
            st = monitor.load(ctx, job_id=job_id, owner=owner_of(request)) if job_id else None
            if st is None:
                return ["Choose a job.", *[gr.skip()] * (len(monitor_out) - 1), None]
            return [*render(st), st]

        @guarded(len(monitor_out) + 1)
        def on_tick(st: dict[str, Any] | None, request: gr.Request) -> list[Any]:
            if not st or not monitor.advance(ctx, st, owner=owner_of(request)):
                return [gr.skip()] * (len(monitor_out) + 1)
            return [*render(st), st]

        @guarded(1)
        def on_cancel(st: dict[str, Any] | None, request: gr.Request) -> str:
            if not st:
                return "Choose a job first."
            from worker.submit import cancel_job

            with ctx.session() as s:
                cancel_job(s, job_id=st["job_id"], owner=owner_of(request))
            return "Cancel requested."

        def on_jobs(last: dict | None, request: gr.Request) -> list[Any]:
            """Refresh the jobs table and pickers; unchanged parts are skipped, so an open
            dropdown is not re-rendered under the user's pointer every tick."""
            try:
                rows, choices = monitor.job_table(ctx, owner_of(request))
            except Exception:
                log.exception("listing jobs failed")
                return [gr.skip()] * 6
            last = last or {}
            table = gr.skip() if last.get("rows") == rows else rows
            if last.get("choices") == choices:
                pickers = [gr.skip()] * 4
            else:
                play = gr.Dropdown(choices=playground.succeeded_choices(choices))
                pickers = [*[gr.Dropdown(choices=choices) for _ in range(3)], play]
            return [table, *pickers, {"rows": rows, "choices": choices}]

        @guarded(2)
        def on_compare(a: str | None, b: str | None, request: gr.Request) -> tuple[str, Any]:
            owner, shapes = owner_of(request), []
            for job_id in (a, b):
                st = monitor.load(ctx, job_id=job_id, owner=owner) if job_id else None
                if not st or not st["snaps"]:
                    return "Choose two jobs that have an architecture.", gr.skip()
                shapes.append(st["snaps"][-1]["shape"])
            return "", plots.compare_figure(shapes[0], shapes[1], names=(a[:8], b[:8]))

        preset.input(on_preset, form, form)
        upload.upload(on_upload, [upload], [new_msg, dataset])
        predict_btn.click(on_predict, form, [new_msg, predicted])
        launch_btn.click(on_launch, [name, *form], [new_msg, predicted, pick, state, tabs]).then(
            on_pick, [pick], [*monitor_out, state]
        )
        pick.input(on_pick, [pick], [*monitor_out, state])
        scrub.input(lambda st, i: monitor.arch_view(st, i), [state, scrub], [arch, caption])
        monitor_timer.tick(on_tick, [state], [*monitor_out, state], show_progress="hidden")
        cancel_btn.click(on_cancel, [state], [status])
        jobs_seen = gr.State(None)
        jobs_out = [jobs, pick, job_a, job_b, play_job, jobs_seen]
        jobs_timer.tick(on_jobs, [jobs_seen], jobs_out, show_progress="hidden")
        ui.load(on_jobs, [jobs_seen], jobs_out)
        job_b.input(on_compare, [job_a, job_b], [compare_msg, compare_plot])
        job_a.input(on_compare, [job_a, job_b], [compare_msg, compare_plot])
    return ui
