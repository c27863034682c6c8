"""Repository functions: the only way the app and the worker touch job state.

Every function is keyword-only after the first argument, a ``Session`` or a ``sessionmaker``
(then a session is opened and closed for the call). Functions that change state commit before
they return, so each is one atomic unit; pass a dedicated session, not one holding other
pending work. State transitions are conditional UPDATEs (compare-and-set), so two workers,
the reaper and a cancel can race without a lock manager: exactly one wins, and terminal
statuses (succeeded, failed, cancelled) never change again.

One module per concept: :mod:`~db.repo.job` (status machine, leases), :mod:`~db.repo.event`
(the event log and the rows derived from it), :mod:`~db.repo.generation` (the Playground),
:mod:`~db.repo.artifact` (produced files), :mod:`~db.repo.send` (broker sends of queued jobs);
:mod:`~db.repo._session` holds what they share.
Call sites use this package: ``from db import repo; repo.create_job(...)``.
"""

from db.repo._session import MAX_ERROR_MESSAGE, Lease, LeaseLost, SessionLike, finite, upsert
from db.repo.artifact import add_artifact, artifacts
from db.repo.event import (
    evals,
    events_after,
    last_event_seq,
    metrics,
    record_events,
    snapshots,
)
from db.repo.generation import (
    create_generation,
    finish_generation,
    get_generation,
    heartbeat_generation,
    mark_generation_sent,
    reap_generations,
    start_generation,
    unsent_generations,
)
from db.repo.job import (
    ActiveLimit,
    active_jobs,
    cancel_requested,
    claim_job,
    create_job,
    finish_job,
    get_job,
    heartbeat,
    list_jobs,
    queue_position,
    reap_orphans,
    request_cancel,
    set_checkpoint,
)
from db.repo.send import mark_sent, set_celery_task_id, unsent_jobs

__all__ = [
    "MAX_ERROR_MESSAGE",
    "ActiveLimit",
    "active_jobs",
    "Lease",
    "LeaseLost",
    "SessionLike",
    "add_artifact",
    "artifacts",
    "cancel_requested",
    "claim_job",
    "create_generation",
    "create_job",
    "evals",
    "events_after",
    "finish_generation",
    "finish_job",
    "finite",
    "get_generation",
    "get_job",
    "heartbeat",
    "heartbeat_generation",
    "last_event_seq",
    "list_jobs",
    "mark_generation_sent",
    "mark_sent",
    "metrics",
    "queue_position",
    "reap_generations",
    "reap_orphans",
    "record_events",
    "request_cancel",
    "set_celery_task_id",
    "set_checkpoint",
    "snapshots",
    "start_generation",
    "unsent_generations",
    "unsent_jobs",
    "upsert",
]
