"""The web app: Gradio Blocks mounted on FastAPI (launch jobs, monitor them, download exports).

The web process never imports torch: it uses only efficientllm's torch-free modules (config,
budget, shape, presets, errors, model_io's config readers), the DB and ``worker.submit``
(``tests/test_layering.py`` and the app tests check it).
"""
