"""Which model sources a multi-user server accepts: Hub ids and folders in one allowed directory.

``from_pretrained`` takes a hub id *or* a local path, so on a shared server a model field
would otherwise read any folder the server can see. With login on, a model field must be

- a Hugging Face model id, checked with the Hub's own rules (``huggingface_hub``'s
  ``validate_repo_id``: ``name`` or ``org/name``, letters, digits, ``-``, ``_``, ``.``, no ``--``
  or ``..``, at most 96 characters) and additionally ASCII only (no look-alike letters), or
- an absolute path inside the allowed models directory (``EFFICIENTLLM_MODELS_DIR``).

Rejection is decided on the string alone: a path outside the directory is refused before any
filesystem call; only a path that passes is resolved (symlinks followed) and checked again.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from efficientllm.errors import ConfigError

try:  # the Hub's own rules (installed with gradio); imported here, not during a check
    from huggingface_hub.utils import validate_repo_id
except ImportError:  # pragma: no cover
    validate_repo_id = None  # type: ignore[assignment]

MAX_ID_LEN = 96
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?:{_PART}/)?{_PART}", re.ASCII)
"""The Hub's ``REPO_ID_REGEX`` (``^(\\b[\\w\\-.]+\\b/)?\\b[\\w\\-.]{1,96}\\b$``) in ASCII."""


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a valid Hugging Face model id (pure string check, no I/O)."""
    if (
        not isinstance(text, str)
        or not 0 < len(text) <= MAX_ID_LEN
        or not _HUB_ID.fullmatch(text)
        or "--" in text
        or ".." in text
        or text.endswith(".git")
    ):
        return False
    if validate_repo_id is None:  # pragma: no cover - huggingface_hub not installed
        return True
    try:
        validate_repo_id(text)
    except ValueError:  # HFValidationError
        return False
    return True


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def check_source(source: str, *, models_dir: Path | None, where: str = "model.source") -> str:
    """``source`` as the config should hold it, or ``ConfigError`` saying what is accepted.

    ``models_dir`` None (login off): anything, unchanged (``from_pretrained`` decides). Else a
    hub id (returned as is) or an absolute path inside ``models_dir`` (returned resolved).
    """
    if models_dir is None:
        return source
    text = source.strip() if isinstance(source, str) else ""
    if is_hub_id(text):
        return text
    root = str(models_dir)
    if text.startswith("/") and "\0" not in text and text.isprintable():
        norm = posixpath.normpath(text)
        if norm.startswith(root.rstrip("/") + "/"):
            real = os.path.realpath(norm)  # the only filesystem access, for a path inside root
            if not real.startswith(root.rstrip("/") + "/"):
                raise ConfigError(f"{where}: {_short(text)} leads outside {root}")
            if not os.path.isdir(real):
                raise ConfigError(f"{where}: no model folder {_short(text)} in {root}")
            return real
    raise ConfigError(
        f"{where}: {_short(text)} is neither a Hugging Face model id (name or org/name: "
        f"letters, digits, '-', '_', '.'; at most {MAX_ID_LEN} characters) nor a folder "
        f"inside {root}"
    )
