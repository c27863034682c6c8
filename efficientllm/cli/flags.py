"""Command-line options generated from the config dataclasses' fields and their docstrings.

Every field of ``RunConfig`` is a flag named after its path in the config file
(``--train.lr 1e-4``, ``--budget.granularity uniform``); a field whose name is unique across
sections also answers to the short form (``--lr``), and a few common ones keep a letter
(``-m/--model``, ``-d/--data``, ``-b/--budget``, ``-o/--out``). Help texts are the field docs,
the same text the web form shows, so the CLI and the UI cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import typer

from efficientllm.cli.common import choice, plain
from efficientllm.config import RunConfig, field_docs

ALIASES: dict[str, tuple[str, ...]] = {
    "model.source": ("--model", "-m"),
    "data.train": ("--data", "-d"),
    "budget.target": ("--budget", "-b"),
    "out_dir": ("--out", "-o"),
}
"""Extra names of the most used flags (the short forms every example uses)."""


@dataclass(frozen=True)
class Flag:
    """One generated option: where its value goes in the config and how it is declared."""

    path: str
    """Dotted config path (``train.lr``) or a top-level field (``out_dir``)."""
    param: str
    """Python parameter name of the command function."""
    option: Any
    """The ``typer.Option`` declaration."""
    annotation: Any


def _help(doc: str) -> str:
    return re.sub(r"\s+", " ", doc).strip()


def _choices(hint: Any) -> list[str] | None:
    if get_origin(hint) is Literal:
        return [str(a) for a in get_args(hint)]
    return None


def _enum_name(path: str) -> str:
    return "".join(part.title() for part in re.split(r"[._]", path))


def _flag(path: str, names: list[str], hint: Any, default: Any, doc: str) -> Flag:
    param = path.replace(".", "__")
    shown = f" [config default: {default}]" if default not in ("", [], None) else ""
    kwargs: dict[str, Any] = {"help": _help(doc) + shown, "show_default": False}
    if hint is bool:
        decls = ["/".join((n, "--no-" + n[2:])) for n in names if n.startswith("--")]
        return Flag(path, param, typer.Option(*decls, **kwargs), bool | None)
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        choices = _choices(item)
        kind = choice(_enum_name(path), tuple(choices)) if choices else str
        return Flag(path, param, typer.Option(*names, **kwargs), list[kind] | None)  # type: ignore[valid-type]
    choices = _choices(hint)
    if choices:
        kind = choice(_enum_name(path), tuple(choices))
        return Flag(path, param, typer.Option(*names, **kwargs), kind | None)
    return Flag(path, param, typer.Option(*names, **kwargs), hint | None)


def run_config_flags() -> list[Flag]:
    """One flag per ``RunConfig`` field, in the order of the config."""
    hints_top = get_type_hints(RunConfig)
    sections = [
        f for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints_top[f.name])
    ]
    classes: dict[str, Any] = {s.name: hints_top[s.name] for s in sections}
    per_section = {name: dataclasses.fields(cls) for name, cls in classes.items()}
    counts = Counter(f.name for fs in per_section.values() for f in fs)
    flags = []
    for section in sections:
        cls = classes[section.name]
        hints, docs, default = get_type_hints(cls), field_docs(cls), cls()
        for f in per_section[section.name]:
            path = f"{section.name}.{f.name}"
            dotted = f"--{section.name}.{f.name.replace('_', '-')}"
            names = list(ALIASES.get(path, ()))
            short = f"--{f.name.replace('_', '-')}"
            if counts[f.name] == 1 and f.name not in per_section and short not in names:
                names.append(short)
            names.append(dotted)  # listed last: the help shows the short forms first
            value = getattr(default, f.name)
            flags.append(_flag(path, names, hints[f.name], value, docs.get(f.name, "")))
    top_docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f not in sections:
            names = [*ALIASES.get(f.name, ()), f"--{f.name.replace('_', '-')}"]
            flags.append(_flag(f.name, names, str, f.default, top_docs.get(f.name, "")))
    return flags


def overrides(flags: list[Flag], values: dict[str, Any]) -> dict[str, Any]:
    """The config overrides (nested dict) of the flags that were given."""
    out: dict[str, Any] = {}
    for flag in flags:
        value = values.get(flag.param)
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        value = plain(list(value) if isinstance(value, tuple) else value)
        section, _, name = flag.path.rpartition(".")
        (out.setdefault(section, {}) if section else out)[name or flag.path] = value
    return out


def with_flags(fn: Any, flags: list[Flag]) -> Any:
    """``fn(**kwargs)`` with a signature of its own parameters plus the generated flags, so
    typer builds the options (typer reads ``inspect.signature``)."""
    own = list(inspect.signature(fn).parameters.values())
    own = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    extra = [
        inspect.Parameter(
            f.param,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[f.annotation, f.option],
        )
        for f in flags
    ]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    fn.__signature__ = inspect.Signature(own + extra)
    fn.__annotations__ = {}
    return fn
