"""Architecture snapshots from run events: one pure function for the DB and the Monitor.

A ``started``, ``pruned`` or ``finished`` event that carries a per-layer ``shape`` is a snapshot
of kind ``source``, ``pruned`` or ``final``. :func:`fold_snapshots` folds events into an ordered
list of snapshots; the DB's ``ArchSnapshot`` rows (``repo.record_events``) and the Monitor's live
state (``app.monitor.fold``) are both built by it, so the page shows after a reload exactly what
it showed live. Plain Python (no SQLAlchemy, no torch): events are ``Event.to_dict()`` dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol, TypedDict, get_args

SnapshotKind = Literal["source", "pruned", "final"]
SNAPSHOT_KINDS: tuple[SnapshotKind, ...] = get_args(SnapshotKind)
KIND_OF_EVENT: dict[str, SnapshotKind] = {
    "started": "source",
    "pruned": "pruned",
    "finished": "final",
}
"""Event type -> the kind of snapshot it carries."""
PARAMS_FIELD: dict[str, str] = {
    "started": "source_params",
    "pruned": "params_after",
    "finished": "params",
}
"""Event type -> the field holding the parameter count of its shape."""


class Snapshot(TypedDict):
    """The per-layer shape at one moment (the fields of an ``ArchSnapshot`` row)."""

    kind: SnapshotKind
    step: int
    tokens: int
    params: int | None
    shape: dict[str, Any]
    """``ModelShape.to_dict()``: hidden_size, head_dim, vocab_size, layers[...]."""
    removed: dict[str, Any] | None
    """Units removed by this pruning event per group kind (None for source/final)."""
    saliency: dict[str, Any] | None
    """Mean normalised saliency per group kind at this pruning event (None if not reported)."""


class SnapshotRow(Protocol):
    """What :func:`snapshot_from_row` reads (an ``ArchSnapshot`` row, or anything alike)."""

    kind: str
    step: int
    tokens: int
    params: int | None
    shape: dict[str, Any]
    removed: dict[str, Any] | None
    saliency: dict[str, Any] | None


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats (which PostgreSQL's JSON rejects) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def snapshot_of(event: Mapping[str, Any]) -> Snapshot | None:
    """The snapshot an event carries, or None (another event type, or no ``shape``)."""
    etype = str(event.get("type", ""))
    kind = KIND_OF_EVENT.get(etype)
    if kind is None or not isinstance(event.get("shape"), dict):
        return None
    params = event.get(PARAMS_FIELD[etype])
    return Snapshot(
        kind=kind,
        step=int(event.get("step", 0)),
        tokens=int(event.get("tokens", 0)),
        params=None if params is None else int(params),
        shape=json_safe(event["shape"]),
        removed=json_safe(event.get("removed")),
        saliency=json_safe(event.get("saliency")),
    )


def snapshot_from_row(row: SnapshotRow) -> Snapshot:
    """A stored snapshot row as a :class:`Snapshot`."""
    kind = row.kind
    if kind not in SNAPSHOT_KINDS:
        raise ValueError(f"unknown snapshot kind {kind!r}")
    return Snapshot(
        kind=kind,  # checked just above
        step=int(row.step),
        tokens=int(row.tokens or 0),
        params=row.params,
        shape=row.shape,
        removed=row.removed,
        saliency=row.saliency,
    )


def merge_snapshot(snaps: list[Snapshot], snap: Snapshot) -> int | None:
    """Fold ``snap`` into the ordered ``snaps`` in place: the index it took, or None if ignored.

    The first source stays (a resumed attempt re-announces the same source shape); a pruned or
    final snapshot replaces the one of its kind at its step (a resumed attempt re-reports it)
    and is appended otherwise, so the order is that of first appearance.
    """
    for i, old in enumerate(snaps):
        if old["kind"] != snap["kind"]:
            continue
        if snap["kind"] == "source":
            return None
        if old["step"] == snap["step"]:
            snaps[i] = snap
            return i
    snaps.append(snap)
    return len(snaps) - 1


def fold_snapshots(snaps: list[Snapshot], events: Iterable[Mapping[str, Any]]) -> list[int]:
    """Fold the snapshots of ``events`` into ``snaps`` in place; the indices added or replaced."""
    changed: list[int] = []
    for event in events:
        snap = snapshot_of(event)
        if snap is None:
            continue
        i = merge_snapshot(snaps, snap)
        if i is not None and i not in changed:
            changed.append(i)
    return changed
