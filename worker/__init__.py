"""Background jobs: the Celery app, the ``run_job`` task, DB/Redis event sinks, lease and
heartbeat, submission for the app, and the embedded local worker.

Layering: ``worker`` -> ``efficientllm`` + ``db``. The web app imports only ``worker.submit``
(which loads no torch) and sends the task by name.
"""
