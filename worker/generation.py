"""The Playground task ``efficientllm.generate(gen_id)``, idempotent per id.

generation queued -> running under a lease with a heartbeat (else a duplicate delivery: no-op)
-> load ``<data>/runs/<job_id>/export`` (safetensors, no remote code) and its tokenizer ->
``model.generate`` under ``torch.no_grad`` -> store the decoded continuation, or a one-line
error, with a write the DB refuses once the lease is stale.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from db import repo
from worker.celery_app import GENERATE_TASK_NAME, app
from worker.lease import Heartbeat, sessions, worker_id
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

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
    me = worker_id()
    gen = repo.start_generation(sm, gen_id=gen_id, worker_id=me, ttl_s=settings.lease_ttl_s)
    if gen is None:
        log.info("generation %s: not queued (duplicate, leased or finished); skipping", gen_id)
        return "noop"
    lease = repo.Lease(me, gen.attempt)
    export_dir = settings.runs_dir / gen.job_id / "export"
    t0, n_tokens = time.monotonic(), 0
    hb = Heartbeat(
        sm,
        job_id=gen_id,
        owner=me,
        attempt=gen.attempt,
        ttl_s=settings.lease_ttl_s,
        interval_s=settings.heartbeat_s,
        kind="generation",
    )
    try:
        with hb:
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
        sm, gen_id=gen_id, status=status, output=output, error_message=message, lease=lease
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
