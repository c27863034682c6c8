"""Jane Austen's six novels (public domain) as UTF-8 text, without R and without a data hub.

The Debian package ``r-cran-janeaustenr`` holds them as character vectors (one element per line)
in an R lazy-load database; :func:`austen_books` downloads the package once (``apt-get
download`` + ``dpkg-deb -x``), reads the database with :mod:`efficientllm.assets.lazyload` and
writes one ``.txt`` file per novel into the cache.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from efficientllm.assets.cache import is_complete, read_marker, resolve_root, staging, write_marker
from efficientllm.assets.lazyload import read_lazyload_db
from efficientllm.errors import DataError

log = logging.getLogger(__name__)

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_TITLES: dict[str, str] = {  # R variable -> title, in publication order
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
DEMO_HELDOUT_BOOK = "Persuasion"
"""The novel held out for perplexity in the demo; the other five are training text."""


def book_filename(title: str) -> str:
    """``"Pride & Prejudice"`` -> ``"pride_and_prejudice.txt"``."""
    return title.lower().replace(" & ", "_and_").replace(" ", "_") + ".txt"


def austen_books(*, cache_dir: Path | str | None = None) -> dict[str, Path]:
    """Jane Austen's six novels as UTF-8 ``.txt`` files in ``<cache>/austen/``: title -> path,
    in publication order. Lines are joined with ``"\\n"``; blank lines separate paragraphs.

    Built once from the Debian package ``r-cran-janeaustenr`` (``apt-get download`` +
    ``dpkg-deb -x``; R is not needed). Raises :class:`~efficientllm.errors.DataError` when that
    is not possible.
    """
    final = resolve_root(cache_dir) / "austen"
    if not is_complete(final):
        with staging(final) as tmp:
            _build_austen(tmp)
    meta = read_marker(final)
    return {title: final / name for title, name in meta["books"].items()}


def book_text(lines: Sequence[Any], *, name: str) -> str:
    """One novel's text from its R character vector: lines joined with ``"\\n"`` (``NA`` as an
    empty line), leading/trailing blank lines dropped, one final newline."""
    if not all(s is None or isinstance(s, str) for s in lines):
        raise DataError(f"{AUSTEN_PACKAGE}: variable {name!r} is not a character vector")
    return "\n".join("" if s is None else str(s) for s in lines).strip("\n") + "\n"


def write_books(variables: dict[str, Any], out: Path) -> dict[str, str]:
    """Write the six novels of ``variables`` (R variable -> character vector) into ``out``;
    title -> file name."""
    books: dict[str, str] = {}
    for var, title in AUSTEN_TITLES.items():
        lines = variables.get(var)
        if lines is None or isinstance(lines, str | dict) or not hasattr(lines, "__len__"):
            raise DataError(f"{AUSTEN_PACKAGE}: variable {var!r} is not a character vector")
        items = lines.tolist() if hasattr(lines, "tolist") else list(lines)
        text = book_text(items, name=var)
        name = book_filename(title)
        (out / name).write_text(text, encoding="utf-8")
        books[title] = name
        log.info("wrote %s (%d lines, %d characters)", name, len(items), len(text))
    return books


def _build_austen(out: Path) -> None:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(
                f"`{tool}` is not available, so the Austen demo text cannot be unpacked; "
                f"install the Debian package {AUSTEN_PACKAGE} yourself (on a Debian/Ubuntu "
                "machine) or pass your own --data files"
            )
    with tempfile.TemporaryDirectory(prefix="efficientllm-austen-") as work_str:
        work = Path(work_str)
        log.info("downloading the Debian package %s", AUSTEN_PACKAGE)
        _run(["apt-get", "download", AUSTEN_PACKAGE], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise DataError(
                f"`apt-get download {AUSTEN_PACKAGE}` produced no .deb; run `apt-get update`, "
                "or pass your own --data files"
            )
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], cwd=work)
        base = work / "root" / AUSTEN_RDATA
        variables = read_lazyload_db(base.with_suffix(".rdx"), base.with_suffix(".rdb"))
    books = write_books(variables, out)
    meta = {
        "asset": "austen",
        "source": f"Debian package {AUSTEN_PACKAGE} (R package janeaustenr; texts public domain)",
        "books": books,
        "heldout": DEMO_HELDOUT_BOOK,
    }
    write_marker(out, meta)


def _run(cmd: list[str], *, cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise DataError(
            f"could not run `{' '.join(cmd)}`: {err}; pass your own --data files"
        ) from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"`{' '.join(cmd)}` failed ({'; '.join(detail)}); install the Debian package "
            f"{AUSTEN_PACKAGE} by hand, or pass your own --data files"
        )
