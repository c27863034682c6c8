"""Register the heterogeneous model with transformers' Auto classes without importing torch.

``import efficientllm`` must stay light (the web process imports the config and planning modules
and must not load torch), yet ``import efficientllm`` followed by
``AutoModelForCausalLM.from_pretrained(export)`` must find our class. So: register at once if
transformers' auto-model module is already loaded, otherwise register right after it loads (a
meta-path hook that wraps that one module's loader and removes itself afterwards).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "transformers.models.auto.modeling_auto"


def _register() -> None:
    from efficientllm.modeling import register_auto_classes

    register_auto_classes()


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if possible, else as soon as transformers loads its auto-model module."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
