"""Config files and mappings -> typed dataclasses, and the field docs that every view shows.

Torch-free and independent of which config it reads: ``config.py`` holds the dataclasses and
their validation, this module the generic parsing (YAML/JSON, type coercion with one message per
problem) and ``field_docs`` (the docstring under each field: CLI help and UI info lines).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from efficientllm.errors import ConfigError


def build_dataclass(cls: Any, d: Any, prefix: str, problems: list[str]) -> Any:
    """An instance of dataclass ``cls`` from mapping ``d``: values coerced to the field types,
    nested dataclasses built alike; every problem is appended to ``problems`` (fields that fail
    keep their defaults), none raised."""
    if not isinstance(d, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
        return cls()
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in d:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown setting (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        value, hint, where = d[f.name], hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = build_dataclass(hint, value, where + ".", problems)
        else:
            ok, value = _coerce(value, hint)
            if ok:
                kwargs[f.name] = value
            else:
                problems.append(f"{where}: {d[f.name]!r} is not a valid {_describe(hint)}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded above
        problems.append(str(err))
        return cls()


def _describe(hint) -> str:
    if get_origin(hint) is Literal:
        return "choice of " + "|".join(map(str, get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint) -> tuple[bool, Any]:
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint), value
    if origin is list:
        if isinstance(value, str | Path):
            value = [value]
        if not isinstance(value, list | tuple):
            return False, value
        (item,) = get_args(hint)
        out = []
        for v in value:
            ok, v = _coerce(v, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return isinstance(value, int), value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, value
        return math.isfinite(value), float(value)
    if hint is str:
        return isinstance(value, str | Path), str(value)
    return True, value


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a YAML or JSON config file (validated later, after merging)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:
        raise ConfigError(f"{path}: cannot parse ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def field_docs(cls) -> dict[str, str]:
    """Field docstrings of a config dataclass (for --help texts and UI tooltips)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = str(nxt.value.value)
    return docs
