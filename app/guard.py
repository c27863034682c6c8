"""How a handler's errors reach the page: :func:`guarded` (a message, never a traceback)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from efficientllm.errors import EfficientLLMError

log = logging.getLogger(__name__)
GENERIC = "Something went wrong on the server; the details are in the server log."


def guarded(n_outputs: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Show errors as the first output (a message); the other outputs stay unchanged.

    An ``EfficientLLMError`` becomes its own message; anything else the generic one, with the
    traceback in the server log only.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except EfficientLLMError as err:
                msg = f"**Cannot do that:** {err}"
            except Exception:
                log.exception("handler %s failed", fn.__name__)
                msg = f"**Error:** {GENERIC}"
            return (msg, *[gr.skip()] * (n_outputs - 1)) if n_outputs > 1 else msg

        return inner

    return wrap
