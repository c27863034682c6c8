"""A terminal progress bar as an event sink: phase, step, tokens, loss, params vs budget, ETA."""

from __future__ import annotations

import sys
from typing import Any

from efficientllm.pruning.budget import format_params
from efficientllm.training.events import (
    CheckpointSaved,
    Evaluated,
    Event,
    Exported,
    Failed,
    Pruned,
    RunStarted,
    StepMetrics,
    Stopped,
)


class ProgressSink:
    """Renders the event stream with tqdm on stderr; notable events print a line above it."""

    def __init__(self, *, disable: bool = False) -> None:
        self.disable = disable
        self.bar: Any = None
        self.budget = 0

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif not self.disable:
            print(text, file=sys.stderr)

    def emit(self, event: Event) -> None:
        from tqdm.auto import tqdm

        if isinstance(event, RunStarted):
            self.budget = event.budget
            resumed = f", resumed at step {event.resumed_from}" if event.resumed_from else ""
            self._say(
                f"source {format_params(event.source_params)} -> budget "
                f"{format_params(event.budget)}; {event.total_steps} steps, pruning until "
                f"step {event.prune_end_step}{resumed}"
            )
            self.bar = tqdm(
                total=event.total_steps,
                initial=event.step,
                unit="step",
                disable=self.disable,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        elif isinstance(event, StepMetrics) and self.bar is not None:
            self.bar.n = event.step
            self.bar.set_postfix_str(
                f"{event.phase} loss {event.loss:.3f} params {format_params(event.params)}/"
                f"{format_params(self.budget)} tokens {event.tokens:,} "
                f"{event.tokens_per_s:,.0f} tok/s",
                refresh=False,
            )
            self.bar.update(0)
        elif isinstance(event, Pruned):
            removed = ", ".join(f"{n} {k}" for k, n in event.removed.items())
            self._say(
                f"step {event.step}: pruned {removed} -> {event.params_after:,} params "
                f"(target {event.target_params:,})"
            )
        elif isinstance(event, Evaluated):
            self._say(
                f"step {event.step}: held-out perplexity {event.ppl:.2f} [{event.label}] "
                f"({event.protocol})"
            )
        elif isinstance(event, CheckpointSaved):
            self._say(f"step {event.step}: checkpoint {event.path}")
        elif isinstance(event, Exported):
            self._say(f"exported {event.format} model ({event.params:,} params) to {event.path}")
        elif isinstance(event, Stopped | Failed):
            self._say(
                f"step {event.step}: {event.type}: "
                f"{getattr(event, 'reason', '') or getattr(event, 'error', '')}"
            )
        if isinstance(event, Exported | Stopped | Failed) and self.bar is not None:
            self.bar.close()
            self.bar = None
