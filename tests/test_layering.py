"""The layering of architecture.md, enforced: the library pulls in none of the app's stack, the
DB layer and the torch-free parts of the library never import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loaded(stmt: str, modules: list[str]) -> list[str]:
    code = f"import sys\n{stmt}\nprint(','.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [m for m in out.stdout.strip().split(",") if m]


def test_library_imports_no_app_stack() -> None:
    stmt = "import efficientllm, efficientllm.trainer, efficientllm.cli, efficientllm.export"
    assert (
        _loaded(stmt, ["gradio", "celery", "sqlalchemy", "redis", "plotly", "db", "worker", "app"])
        == []
    )


@pytest.mark.parametrize(
    "stmt",
    [
        "import efficientllm.shape, efficientllm.budget, efficientllm.config, efficientllm.presets",
        "import efficientllm.curves, efficientllm.groups",
        "from efficientllm.model_io import source_shape",
        "import db.repo, db.engine",
    ],
)
def test_torch_free_modules(stmt: str) -> None:
    assert _loaded(stmt, ["torch", "transformers"]) == []


def test_import_efficientllm_then_automodel_loads_an_export(tmp_path) -> None:
    """Registration is lazy (no torch at import) but still in place when transformers loads."""
    from tiny import tiny_model

    from efficientllm.export import export_model
    from efficientllm.groups import Group
    from efficientllm.model_io import shape_from_config
    from efficientllm.modeling import EfficientLLMForCausalLM
    from efficientllm.prune import prune_

    model = EfficientLLMForCausalLM.from_family(tiny_model("llama_gqa_tied"))
    shape = shape_from_config(model.config.to_dict())
    prune_(model, shape, [Group("ffn", 0, (1, 2))])  # heterogeneous: needs our class
    export_model(model, tmp_path / "exp", fmt="efficientllm")
    for order in (
        "import efficientllm\nfrom transformers import AutoModelForCausalLM",
        "from transformers import AutoModelForCausalLM\nimport efficientllm",
    ):
        code = f"{order}\nm = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'exp')!r})\n"
        code += "print(type(m).__name__)"
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().endswith("EfficientLLMForCausalLM")
