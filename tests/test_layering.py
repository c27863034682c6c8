"""The layering of architecture.md, enforced: the library pulls in none of the app's stack, the
DB layer and the torch-free parts of the library never import torch."""

from __future__ import annotations

import ast
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
    stmt = (
        "import efficientllm, efficientllm.training.trainer, efficientllm.cli, efficientllm.export"
    )
    assert (
        _loaded(stmt, ["gradio", "celery", "sqlalchemy", "redis", "plotly", "db", "worker", "app"])
        == []
    )


@pytest.mark.parametrize(
    "stmt",
    [
        "import efficientllm.shape, efficientllm.pruning.budget, efficientllm.config",
        "import efficientllm.presets, efficientllm.choices",
        "import efficientllm.curves, efficientllm.pruning.groups",
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
    from efficientllm.model_io import shape_from_config
    from efficientllm.modeling import EfficientLLMForCausalLM
    from efficientllm.pruning.groups import Group
    from efficientllm.pruning.prune import prune_

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


# ---- the import graph of our packages: no cycles, no long modules ------------------------------
PACKAGES = ("efficientllm", "app", "db", "worker")
MAX_LINES = 350


def _modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (module level, in functions, under
    ``TYPE_CHECKING``); ``from x import y`` is ``x.y`` when that is a module, else ``x``."""

    def ours(dotted: str) -> str | None:  # the longest known module prefix of ``dotted``
        parts = dotted.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(m for a in node.names if (m := ours(a.name)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                target = ours(f"{base}.{alias.name}") if alias.name != "*" else None
                if target != f"{base}.{alias.name}":
                    target = ours(base)
                if target:
                    found.add(target)
    found.discard(name)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (statically, with ``ast``)."""
    mods = _modules(root, packages)
    return {name: _imported(name, path, set(mods)) for name, path in mods.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def _edges_within(graph: dict[str, set[str]], cycle: list[str]) -> list[str]:
    return [f"{a} -> {b}" for a in cycle for b in sorted(graph[a]) if b in cycle]


def test_no_import_cycles_between_our_modules() -> None:
    graph = import_graph(ROOT)
    assert {"app.views", "db.repo", "worker.tasks", "efficientllm.config"} <= set(graph)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{c}: " + "; ".join(_edges_within(graph, c)) for c in cycles
    )


def test_cycle_finder_sees_function_level_and_from_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")  # a -> pkg.sub.b
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")  # b -> pkg.c
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    (pkg / "d.py").write_text("from pkg import a, missing\nimport os\n")  # d -> a, pkg
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.d"] == {"pkg.a", "pkg"}
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("import os\n")
    assert import_cycles(import_graph(tmp_path, ("pkg",))) == []


def test_no_module_over_the_line_limit() -> None:
    long = {
        name: n
        for name, path in _modules(ROOT).items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"
