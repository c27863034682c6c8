"""What every command shares: the Typer app, the error wrapper and the common options."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from functools import cache, wraps
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeVar

import typer

from efficientllm.choices import EXPORT_FORMATS, GRANULARITIES, SCORERS
from efficientllm.config import BudgetConfig, ModelConfig, field_docs
from efficientllm.errors import EfficientLLMError
from efficientllm.shape import ModelShape

app = typer.Typer(
    help="EfficientLLM: prune Hugging Face causal LMs to a parameter budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn library errors into one ``error:`` line and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (EfficientLLMError, FloatingPointError) as err:
            typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def doc(cls: type, name: str) -> str:
    """A config field's docstring as one line (the help text of the option for it)."""
    return " ".join(field_docs(cls)[name].split())


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help=doc(ModelConfig, "source"), show_default=False)
]
BudgetOpt = Annotated[
    str, typer.Option("--budget", "-b", help=doc(BudgetConfig, "target"), show_default=False)
]


@cache
def choice(name: str, values: Sequence[str]) -> type[Enum]:
    """A str Enum of ``values`` (how typer declares a choice; lists of Literals it cannot)."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def plain(value: Any) -> Any:
    """An option's value with Enum members turned back into their strings."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


if TYPE_CHECKING:  # the type checker sees the strings the Enums stand for
    GranularityChoice: TypeAlias = str
    ScorerChoice: TypeAlias = str
    FormatChoice: TypeAlias = str
else:
    GranularityChoice = choice("Granularity", GRANULARITIES)
    ScorerChoice = choice("Scorer", SCORERS)
    FormatChoice = choice("ExportFormat", EXPORT_FORMATS)

GranOpt = Annotated[
    GranularityChoice,
    typer.Option(
        "--granularity",
        "-g",
        help=doc(BudgetConfig, "granularity"),
    ),
]
HiddenMulOpt = Annotated[int, typer.Option(help=doc(BudgetConfig, "hidden_multiple"), min=1)]
FfnMulOpt = Annotated[int, typer.Option(help=doc(BudgetConfig, "ffn_multiple"), min=1)]


def layer_rows(shape: ModelShape) -> list[str]:
    """Runs of identical layers, one line each."""
    rows, start = [], 0
    layers = shape.layers
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            ly = layers[start]
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            rows.append(
                f"  layers {span:>7}: heads {ly.num_heads:>3} / kv {ly.num_kv_heads:>2}   "
                f"ffn {ly.intermediate_size:>6}"
            )
            start = i
    return rows
