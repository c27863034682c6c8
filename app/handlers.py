"""The callbacks of the main tabs (new job, jobs, monitor, compare), bound to one app context.

:mod:`app.views` lays the widgets out and wires their events to the methods of a
:class:`Handlers`; every method that can fail is wrapped by :func:`app.guard.guarded`, so an
error is a message in the page, never a traceback. All state comes from the DB (through
:mod:`app.monitor`), so a page refresh or a server restart loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import gradio as gr

from app import forms, monitor, playground, plots
from app.context import AppContext
from app.guard import guarded

log = logging.getLogger(__name__)
MONITOR_OUTPUTS = (
    "status",
    "arch",
    "scrub",
    "caption",
    "params_plot",
    "loss_plot",
    "sal_plot",
    "events",
    "table",
    "ppl_md",
    "download",
)
"""The Monitor widgets :meth:`Handlers.render` fills, in its order."""
N_MONITOR = len(MONITOR_OUTPUTS)


def drawn_from(st: dict[str, Any]) -> dict[str, Any] | None:
    """Per :data:`MONITOR_OUTPUTS` name, what that output is drawn from: an output whose value
    here equals the one recorded when it was last sent (``st["drawn"]``) would be drawn the
    same, so a tick skips it. The charts are keyed by the change counts of
    :func:`app.monitor.fold` (a step moves the loss and size charts only; a snapshot, i.e. a
    pruning event, the per-layer chart, its slider and caption together, and the saliency
    chart); the cheap texts by themselves. None for a state without counts (always redrawn)."""
    rev = st.get("rev")
    if rev is None:
        return None
    metrics, evals, snaps = rev.get("metrics"), rev.get("evals"), rev.get("snaps")
    done = (snaps, evals, rev.get("export")) if st["job"]["status"] == "succeeded" else None
    return {
        "status": monitor.status_text(st["job"]),
        "arch": snaps,
        "scrub": snaps,
        "caption": snaps,
        "params_plot": metrics,
        "loss_plot": (metrics, evals),
        "sal_plot": snaps,
        "events": rev.get("log"),
        "table": done,
        "ppl_md": done,
        "download": done,
    }


class Handlers:
    """Event callbacks bound to ``ctx``; the form values arrive in ``forms.FIELD_ORDER``."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.watching: dict[str, str] = {}
        """Browser session -> the job its Monitor shows (the latest pick)."""

    def owner_of(self, request: gr.Request) -> str:
        """The job owner behind a Gradio request."""
        return self.ctx.owner(getattr(request, "username", None))

    def config_of(self, values: forms.FormValues, request: gr.Request) -> dict[str, Any]:
        """The run config of the form, owned by the request's user."""
        return forms.form_to_config(
            values,
            owner=self.owner_of(request),
            data_root=self.ctx.data_dir,
            models_dir=self.ctx.models_dir,
        )

    @staticmethod
    def values_of(*values: Any) -> forms.FormValues:
        """The form widgets' values (in ``forms.FIELD_ORDER``) as one object."""
        return forms.FormValues(**dict(zip(forms.FIELD_ORDER, values, strict=True)))

    @staticmethod
    def render(st: dict[str, Any], only: Collection[str] | None = None) -> list[Any]:
        """The :data:`MONITOR_OUTPUTS` values for a monitor state; with ``only``, the outputs
        not named there are ``gr.skip()`` (not built, and Gradio sends nothing for them)."""
        todo = set(MONITOR_OUTPUTS if only is None else only)
        v: dict[str, Any] = {}
        if todo & {"arch", "scrub", "caption"}:  # together: the slider names the chart's snapshot
            fig, cap = monitor.arch_view(st, None)
            n = max(len(st["snaps"]) - 1, 0)
            v.update(arch=fig, scrub=gr.Slider(maximum=max(n, 1), value=n), caption=cap)
        if "status" in todo:
            v["status"] = monitor.status_text(st["job"])
        if "params_plot" in todo:
            v["params_plot"] = plots.params_figure(st["metrics"])
        if "loss_plot" in todo:
            evals = [e for e in st["evals"] if e.get("ppl") is not None]
            v["loss_plot"] = plots.loss_figure(st["metrics"], evals)
        if "sal_plot" in todo:
            sal = [s for s in st["snaps"] if s["kind"] == "pruned"]
            v["sal_plot"] = plots.saliency_figure(sal, st["source"])
        if "events" in todo:
            v["events"] = "\n".join(reversed(st["log"][-100:]))
        if todo & {"table", "ppl_md", "download"}:
            v["table"], v["ppl_md"], v["download"] = monitor.results(st)
        return [v[name] if name in todo else gr.skip() for name in MONITOR_OUTPUTS]

    # ---- new job ---------------------------------------------------------------------------
    @guarded(len(forms.FIELD_ORDER))
    def on_preset(self, *values: Any) -> list[Any]:
        return forms.preset_form(values[0], self.values_of(*values)).as_list()

    @guarded(2)
    def on_upload(self, file: Any, request: gr.Request) -> tuple[str, Any]:
        if file is None:
            return "", gr.skip()
        path = getattr(file, "name", file)
        ds = forms.save_upload(
            path,
            owner=self.owner_of(request),
            data_root=self.ctx.data_dir,
            max_bytes=self.ctx.max_upload_bytes,
        )
        return f"Uploaded as `{ds}`.", gr.Dropdown(choices=[forms.DEMO_DATA, ds], value=ds)

    @guarded(2)
    def on_predict(self, request: gr.Request, *values: Any) -> tuple[str, Any]:
        p = forms.predict(self.config_of(self.values_of(*values), request))
        msg = (
            f"**Predicted:** {p.num_params:,} parameters ({plots.params_text(p.num_params)}) "
            f"for a budget of {p.budget:,}; source {p.source.num_params():,}. " + " ".join(p.notes)
        )
        return msg, plots.arch_figure(
            p.shape.to_dict(), p.source.to_dict(), title="predicted", params=p.num_params
        )

    @guarded(5)
    def on_launch(self, request: gr.Request, job_name: str, *values: Any) -> tuple[Any, ...]:
        config = self.config_of(self.values_of(*values), request)
        p = forms.predict(config)  # unknown model, budget above the source: nothing queued
        from worker.submit import submit_job

        owner = self.owner_of(request)
        with self.ctx.session() as s:
            job_id = submit_job(
                s,
                config=config,
                owner=owner,
                name=job_name.strip() or "job",
                queue=self.ctx.queue,
                max_active=self.ctx.max_active_jobs,
            )
        fig = plots.arch_figure(
            p.shape.to_dict(), p.source.to_dict(), title="predicted", params=p.num_params
        )
        _, choices = monitor.job_table(self.ctx, owner)
        msg = f"Queued job `{job_id}` ({plots.params_text(p.num_params)} predicted)."
        st = monitor.load(self.ctx, job_id=job_id, owner=owner)
        return msg, fig, gr.Dropdown(choices=choices, value=job_id), st, gr.Tabs(selected="monitor")

    # ---- monitor ---------------------------------------------------------------------------
    @guarded(N_MONITOR + 1)
    def on_pick(self, job_id: str | None, request: gr.Request) -> list[Any]:
        owner = self.owner_of(request)
        st = monitor.load(self.ctx, job_id=job_id, owner=owner) if job_id else None
        if st is None:
            return ["Choose a job.", *[gr.skip()] * (N_MONITOR - 1), None]
        if (tab := getattr(request, "session_hash", None)) is not None:
            if len(self.watching) > 10_000:
                self.watching.clear()
            self.watching[tab] = st["job_id"]
        st["drawn"] = drawn_from(st)
        return [*self.render(st), st]

    @guarded(N_MONITOR + 1)
    def on_tick(self, st: dict[str, Any] | None, request: gr.Request) -> list[Any]:
        """Only the outputs whose data changed since they were last sent (:func:`drawn_from`):
        rebuilding and sending all five figures on every change made a redraw cost 0.3-1 s."""
        skip = [gr.skip()] * (N_MONITOR + 1)
        if not st or not monitor.advance(self.ctx, st, owner=self.owner_of(request)):
            return skip
        drawn, sent = drawn_from(st), st.get("drawn")
        stale = [
            name
            for name in MONITOR_OUTPUTS
            if drawn is None or sent is None or sent.get(name) != drawn[name]
        ]
        if not stale:
            return skip
        st["drawn"] = None  # until sent: after an error (shown in the status line) redraw all
        out = self.render(st, stale)
        tab = getattr(request, "session_hash", None)
        if self.watching.get(tab or "", st["job_id"]) != st["job_id"]:
            return skip  # the tab picked another job meanwhile
        st["drawn"] = drawn
        return [*out, st]

    @staticmethod
    def on_scrub(st: dict[str, Any] | None, index: int | None) -> tuple[Any, str]:
        return monitor.arch_view(st, index)

    @guarded(1)
    def on_cancel(self, st: dict[str, Any] | None, request: gr.Request) -> str:
        if not st:
            return "Choose a job first."
        from worker.submit import cancel_job

        with self.ctx.session() as s:
            cancel_job(s, job_id=st["job_id"], owner=self.owner_of(request))
        return "Cancel requested."

    # ---- jobs list and compare -------------------------------------------------------------
    def on_jobs(self, last: dict[str, Any] | None, request: gr.Request) -> list[Any]:
        """Refresh the jobs table and pickers; unchanged parts are skipped, so an open
        dropdown is not re-rendered under the user's pointer every tick."""
        try:
            rows, choices = monitor.job_table(self.ctx, self.owner_of(request))
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
    def on_compare(self, a: str | None, b: str | None, request: gr.Request) -> tuple[str, Any]:
        owner, shapes = self.owner_of(request), []
        for job_id in (a, b):
            st = monitor.load(self.ctx, job_id=job_id, owner=owner) if job_id else None
            if not st or not st["snaps"]:
                return "Choose two jobs that have an architecture.", gr.skip()
            shapes.append(st["snaps"][-1]["shape"])
        assert a is not None and b is not None  # both loaded above
        return "", plots.compare_figure(shapes[0], shapes[1], names=(a[:8], b[:8]))
