"""``python -m worker``: migrate the DB, then run one Celery worker for the GPU queue.

One pool process (``-c 1``, one GPU per worker process), prefetch 1, prefork (a fresh child per
job). Gossip, mingle and the Celery heartbeat are off: the DB lease is the liveness signal.
"""

from __future__ import annotations

import logging
import os
import sys

from worker.settings import get_settings


def worker_argv(queue: str, *, loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments for one single-process GPU worker."""
    return [
        "worker",
        "-P",
        "prefork",
        "-c",
        "1",
        "--prefetch-multiplier",
        "1",
        "-Q",
        queue,
        "-n",
        f"efficientllm-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        loglevel,
    ]


def main(argv: list[str] | None = None) -> None:
    from db.engine import upgrade_to_head

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)
    from worker.celery_app import app

    extra = list(sys.argv[1:] if argv is None else argv)
    app.worker_main(
        worker_argv(settings.queue, loglevel=os.environ.get("LOGLEVEL", "INFO")) + extra
    )


if __name__ == "__main__":
    main()
