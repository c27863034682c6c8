"""The web app: Gradio Blocks mounted on FastAPI (launch jobs, monitor them, download exports).

The web process never imports torch. ``efficientllm/__init__.py`` registers its model classes
with transformers (and so imports torch) whenever torch is installed, so importing ``app``
first installs a bare package object for ``efficientllm``: its torch-free submodules (config,
budget, shape, presets, errors, model_io's config readers) then load without running the
package ``__init__``. When ``efficientllm`` is already imported (tests, the worker), nothing
changes.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _bare_efficientllm() -> None:
    """Make ``import efficientllm.<module>`` skip the package ``__init__`` (no torch)."""
    if "efficientllm" in sys.modules:
        return
    spec = importlib.util.find_spec("efficientllm")
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType("efficientllm", "EfficientLLM (torch-free view for the web app)")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["efficientllm"] = pkg


_bare_efficientllm()
