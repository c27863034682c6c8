"""Typed errors. Every user mistake raises one of these with a message that says what is wrong
and how to fix it; the CLI and the UI print the message, never a traceback."""

from __future__ import annotations


class EfficientLLMError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the one-line message to show."""


class ConfigError(EfficientLLMError, ValueError):
    """One or more invalid settings. ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class ModelNotFoundError(EfficientLLMError):
    """The source model (hub id or folder) cannot be found or read."""


class UnsupportedArchitectureError(EfficientLLMError):
    """The model's ``model_type`` has no adapter, or its config asks for remote code."""


class BudgetInfeasibleError(EfficientLLMError, ValueError):
    """The parameter budget cannot be reached: not below the source, or below the smallest legal
    shape. ``reachable`` is the (min, max) range of budgets that can be planned."""

    def __init__(self, message: str, *, reachable: tuple[int, int] | None = None):
        self.reachable = reachable
        super().__init__(message)


class DataError(EfficientLLMError):
    """Training or evaluation text is missing, empty, binary or cannot be decoded."""


class NonFiniteLossError(EfficientLLMError):
    """The loss became NaN or infinite."""


class DecisionMismatchError(EfficientLLMError):
    """The processes of one data-parallel run chose different groups to prune (their saliency
    diverged); raised on every rank before anything is removed."""


class Cancelled(EfficientLLMError):
    """A run was stopped on request (cooperative cancel)."""


class ExportError(EfficientLLMError):
    """An export could not be written or did not reload to the same logits."""
