"""The tasks: ``efficientllm.run_job(job_id)`` and ``efficientllm.generate(gen_id)``, both
idempotent per id.

claim the lease in the DB (else it is a duplicate, cancelled or finished delivery: no-op) ->
heartbeat thread -> ``Trainer`` with out_dir ``<data>/runs/<job_id>`` (a later attempt resumes
from the newest complete checkpoint there) -> register the export's files as artifacts ->
``finish_job``. The training imports happen here, in the pool process, never touching CUDA in
the worker's parent.

``generate`` (the Playground): generation queued -> running (else a duplicate delivery: no-op)
-> load ``<data>/runs/<job_id>/export`` (safetensors, no remote code) and its tokenizer ->
``model.generate`` under ``torch.no_grad`` -> store the decoded continuation, or a one-line error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import repo
from worker.celery_app import GENERATE_TASK_NAME, TASK_NAME, app
from worker.lease import Heartbeat, sessions, worker_id
from worker.settings import Settings, get_settings
from worker.sinks import DbSink

log = logging.getLogger(__name__)

EXIT_CODE = 137  # what a SIGKILLed process reports; fault hooks imitate it


def error_code(err: BaseException) -> str:
    """``NonFiniteLossError`` -> ``non_finite_loss_error`` (the class name in snake case)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()


def make_fault(settings: Settings, attempt: int):
    """The trainer's fault hook: exits the process at the configured point (APP_ENV=test only).

    Point faults fire on the first attempt only, so that the retry can show the recovery.
    """
    fault = settings.fault_hook
    if fault is None or fault == "always_kill" or attempt > 1:
        return None

    def hook(name: str) -> None:
        if name == fault:
            log.warning("FAULT %s: exiting with %d", name, EXIT_CODE)
            os._exit(EXIT_CODE)

    return hook


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def register_export(sm: sessionmaker[Session], *, job_id: str, export_dir: Path, root: Path) -> int:
    """Record every file of a complete export folder (size + sha256); returns how many."""
    n = 0
    root = root.resolve()
    for path in sorted(p for p in export_dir.resolve().rglob("*") if p.is_file()):
        repo.add_artifact(
            sm,
            job_id=job_id,
            kind="export",
            path=path.relative_to(root).as_posix(),
            size_bytes=path.stat().st_size,
            sha256=file_sha256(path),
        )
        n += 1
    return n


def _stop_flag(hb: Heartbeat, settings: Settings):
    delay = settings.step_delay_s if settings.testing else 0.0

    def should_stop() -> bool:
        if delay:
            time.sleep(delay)
        return hb.flag.is_set()

    return should_stop


def _run_parallel(cfg: Any, settings: Settings, sink: DbSink, hb: Heartbeat, attempt: int) -> Any:
    """The job on ``settings.gpus_per_job`` rank subprocesses; this process keeps the lease,
    the heartbeat, the DB sink and the cancel. A killed rank takes this process down too (exit
    137, as if it had been killed itself), so the job is retried from its checkpoint."""
    from worker.parallel import RankCrashed, run_parallel

    fault = make_fault(settings, attempt) and settings.fault_hook
    try:
        return run_parallel(
            cfg,
            nprocs=settings.gpus_per_job,
            sink=sink,
            should_stop=lambda: hb.flag.is_set(),
            step_delay_s=settings.step_delay_s if settings.testing else 0.0,
            fault=fault,
        )
    except RankCrashed as err:
        log.warning("%s: exiting with %d", err, EXIT_CODE)
        sink.close()
        os._exit(EXIT_CODE)


def run(job_id: str, settings: Settings | None = None) -> str:
    """Run (or resume) one job; returns the outcome ('noop', a terminal status or 'lost')."""
    from efficientllm.config import RunConfig
    from efficientllm.errors import EfficientLLMError
    from efficientllm.presets import resolve_demo
    from efficientllm.training.trainer import Trainer

    settings = settings or get_settings()
    sm = sessions(settings.db_url)
    me = worker_id()
    job = repo.claim_job(sm, job_id=job_id, worker_id=me, ttl_s=settings.lease_ttl_s)
    if job is None:
        log.info("job %s: not claimable (duplicate, cancelled or finished); skipping", job_id)
        return "noop"
    log.info("job %s: attempt %d/%d on %s", job_id, job.attempt, job.max_attempts, me)
    if settings.fault_hook == "always_kill":
        log.warning("FAULT always_kill: exiting with %d", EXIT_CODE)
        os._exit(EXIT_CODE)

    def finish(status: str, code: str | None = None, message: str | None = None) -> str:
        ok = repo.finish_job(
            sm, job_id=job_id, worker_id=me, status=status, error_code=code, error_message=message
        )
        if not ok:
            log.warning("job %s: could not record %s (lease lost)", job_id, status)
            return "lost"
        sink.publish_status(status)
        return status

    out_dir = settings.runs_dir / job_id
    sink = DbSink(sm, job_id=job_id, flush_s=settings.event_flush_s, redis_url=settings.redis_url)
    hb = Heartbeat(
        sm, job_id=job_id, owner=me, ttl_s=settings.lease_ttl_s, interval_s=settings.heartbeat_s
    )
    with hb:
        try:
            try:
                cfg = resolve_demo(RunConfig.from_dict({**job.config, "out_dir": str(out_dir)}))
                if settings.gpus_per_job > 1:
                    result = _run_parallel(cfg, settings, sink, hb, job.attempt)
                else:
                    trainer = Trainer(
                        cfg,
                        sink=sink,
                        should_stop=_stop_flag(hb, settings),
                        fault=make_fault(settings, job.attempt),
                    )
                    result = trainer.run()
            finally:
                sink.close()
            if result.status == "stopped":
                if hb.reason == "cancel":
                    return finish("cancelled")
                log.warning("job %s: lease lost; leaving it to its new owner", job_id)
                return "lost"
            if result.export_path is None:
                return finish("failed", "internal", "the run finished without an export")
            register_export(
                sm, job_id=job_id, export_dir=result.export_path, root=settings.data_dir
            )
            return finish("succeeded")
        except EfficientLLMError as err:
            log.warning("job %s failed: %s: %s", job_id, type(err).__name__, err)
            return finish("failed", error_code(err), str(err) or type(err).__name__)
        except Exception as err:
            log.exception("job %s: internal error", job_id)
            return finish("failed", "internal", f"internal error ({type(err).__name__})")


@app.task(name=TASK_NAME, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    """Celery entry point: see :func:`run`."""
    return run(str(job_id))


MAX_NEW_TOKENS = 256


def generate_text(
    export_dir: Path, prompt: str, *, max_new_tokens: int, temperature: float
) -> tuple[str, int]:
    """The decoded continuation of ``prompt`` by the exported model in ``export_dir``, and
    how many tokens it has.

    The prompt keeps its last tokens when prompt + continuation would exceed the model's
    context (``max_position_embeddings``); at most :data:`MAX_NEW_TOKENS` new tokens.
    """
    import torch
    from transformers import AutoTokenizer

    from efficientllm.errors import ConfigError, ModelNotFoundError
    from efficientllm.export import load_exported

    if not (export_dir / "config.json").is_file():
        raise ModelNotFoundError("the job's exported model is missing on the worker")
    try:
        tok = AutoTokenizer.from_pretrained(str(export_dir), trust_remote_code=False)
    except (OSError, ValueError):
        raise ModelNotFoundError("the job's export has no usable tokenizer") from None
    model = load_exported(export_dir)
    model.eval()
    new = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ConfigError("the prompt has no tokens for this model's tokenizer")
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx:
        new = min(new, max(int(ctx) - 1, 1))
        ids = ids[:, -max(int(ctx) - new, 1) :]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs: dict[str, Any] = {"max_new_tokens": new, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = float(temperature)
    else:  # greedy: no sampling knobs, so transformers does not warn about them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kwargs
        )
    new_ids = out[0, ids.shape[1] :]
    return tok.decode(new_ids, skip_special_tokens=True), int(new_ids.shape[0])


def generate(gen_id: str, settings: Settings | None = None) -> str:
    """Run one Playground generation; returns 'noop', 'succeeded', 'failed' or 'lost'."""
    from efficientllm.errors import EfficientLLMError

    settings = settings or get_settings()
    sm = sessions(settings.db_url)
    gen = repo.start_generation(sm, gen_id=gen_id)
    if gen is None:
        log.info("generation %s: not queued (duplicate or finished); skipping", gen_id)
        return "noop"
    export_dir = settings.runs_dir / gen.job_id / "export"
    t0, n_tokens = time.monotonic(), 0
    try:
        text, n_tokens = generate_text(
            export_dir,
            gen.prompt,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
        )
        status, output, message = "succeeded", text, None
    except EfficientLLMError as err:
        log.warning("generation %s failed: %s: %s", gen_id, type(err).__name__, err)
        status, output, message = "failed", None, str(err) or type(err).__name__
    except Exception as err:
        log.exception("generation %s: internal error", gen_id)
        status, output, message = "failed", None, f"generation failed ({type(err).__name__})"
    ok = repo.finish_generation(
        sm, gen_id=gen_id, status=status, output=output, error_message=message
    )
    log.info(
        "generation %s: %s, %d new tokens in %.1f s",
        gen_id,
        status,
        n_tokens,
        time.monotonic() - t0,
    )
    return status if ok else "lost"


@app.task(name=GENERATE_TASK_NAME, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def generate_task(gen_id: str) -> str:
    """Celery entry point: see :func:`generate`."""
    return generate(str(gen_id))


def _preload(**_: Any) -> None:
    """Import the training stack once in the worker's parent (no CUDA use), so pool children
    forked later start jobs at once."""
    import efficientllm.training.trainer  # noqa: F401


def _connect_preload() -> None:
    from celery import signals

    signals.worker_init.connect(_preload, weak=False)


_connect_preload()
