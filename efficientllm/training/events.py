"""Typed run events and the sinks that consume them.

The trainer emits one stream; the CLI progress bar, a JSONL file and the job worker (DB + Redis)
are all sinks of that same stream. Every event is a flat dataclass with a ``type`` tag and
serialises to JSON with ``to_dict``; ``event_from_dict`` reads it back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    step: int = 0
    """Optimizer steps completed when the event happened."""
    tokens: int = 0
    """Training tokens consumed so far."""
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    type: ClassVar[str] = "started"
    source_params: int
    budget: int
    total_steps: int
    prune_end_step: int
    shape: dict[str, Any]
    """The source shape (ModelShape.to_dict)."""
    config: dict[str, Any]
    resumed_from: int | None = None
    num_processes: int = 1
    """Processes training this job together (data parallel; 1 = a plain run)."""


@dataclass(frozen=True, kw_only=True)
class StepMetrics(Event):
    type: ClassVar[str] = "step"
    phase: str
    loss: float
    lr: float
    params: int
    target_params: int
    tokens_per_s: float
    grad_norm: float | None = None


@dataclass(frozen=True, kw_only=True)
class Pruned(Event):
    type: ClassVar[str] = "pruned"
    params_before: int
    params_after: int
    target_params: int
    removed: dict[str, int]
    """Units removed per kind in this event, e.g. {"ffn": 16, "hidden": 8}."""
    saliency: dict[str, float]
    """Mean normalised saliency per kind over the remaining candidates (paper's trajectory plot)."""
    shape: dict[str, Any]
    """The full shape after the event (ModelShape.to_dict)."""


@dataclass(frozen=True, kw_only=True)
class Evaluated(Event):
    type: ClassVar[str] = "eval"
    phase: str
    label: str
    """start | step | after_pruning | final."""
    ppl: float
    loss: float
    protocol: str


@dataclass(frozen=True, kw_only=True)
class PhaseChanged(Event):
    type: ClassVar[str] = "phase"
    phase: str


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved(Event):
    type: ClassVar[str] = "checkpoint"
    path: str


@dataclass(frozen=True, kw_only=True)
class Exported(Event):
    type: ClassVar[str] = "exported"
    path: str
    format: str
    params: int
    gguf: str | None = None
    """The GGUF file for llama.cpp written beside the export (``export.gguf``), if any."""
    gguf_note: str | None = None
    """Why no GGUF file was written although one was asked for."""


@dataclass(frozen=True, kw_only=True)
class Stopped(Event):
    type: ClassVar[str] = "stopped"
    reason: str


@dataclass(frozen=True, kw_only=True)
class Failed(Event):
    type: ClassVar[str] = "failed"
    error: str
    error_type: str


@dataclass(frozen=True, kw_only=True)
class Finished(Event):
    type: ClassVar[str] = "finished"
    params: int
    shape: dict[str, Any]


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        RunStarted,
        StepMetrics,
        Pruned,
        Evaluated,
        PhaseChanged,
        CheckpointSaved,
        Exported,
        Stopped,
        Failed,
        Finished,
    )
}


def event_from_dict(d: dict[str, Any]) -> Event:
    d = dict(d)
    cls = EVENT_TYPES[d.pop("type")]
    return cls(**d)


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


class ListSink:
    """Keeps events in memory (tests, notebooks)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class JsonlSink:
    """Appends one JSON line per event and flushes, so a crash loses at most the line in flight.
    A partial last line (a process killed mid-write) is dropped when the file is reopened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_partial_line(self.path)
        self._fh = self.path.open("a", encoding="utf-8")

    def emit(self, event: Event) -> None:
        self._fh.write(json.dumps(event.to_dict()) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _truncate_partial_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())


def read_events(path: str | Path) -> list[Event]:
    """All complete events in a JSONL file."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(event_from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("skipping unreadable event line in %s", path)
    return out


class MultiSink:
    """Fans one event out to several sinks; a failing sink is logged, never fatal."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def emit(self, event: Event) -> None:
        for s in self.sinks:
            try:
                s.emit(event)
            except Exception:  # a broken consumer must not kill training
                log.exception("event sink %r failed", s)
