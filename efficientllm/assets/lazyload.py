"""R lazy-load databases (``name.rdx`` + ``name.rdb``, as in an installed R package's ``data/``),
read with the maintained ``rdata`` package.

``rdata`` parses R's serialisation format; what it does not know is the lazy-load framing: the
``.rdx`` index is an RDS object listing, per variable, an ``[offset, length]`` into the ``.rdb``,
and each ``.rdb`` entry is a 4-byte big-endian length followed by a compressed serialisation.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientllm.errors import DataError

log = logging.getLogger(__name__)


class RFormatError(DataError):
    """The bytes are not an R serialisation or lazy-load database that can be read."""


def parse_rds(data: bytes, *, what: str) -> Any:
    """Unserialise one R object (XDR or ASCII; gzip/bzip2/xz-compressed or plain) into Python
    values with ``rdata``: character vectors become numpy string arrays (``NA`` -> ``None``),
    named lists become dicts. ``what`` names the source in the error message."""
    import rdata

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parsed = rdata.parser.parse_data(data, extension=".rds")
            value = rdata.conversion.convert(parsed)
        except Exception as err:  # rdata raises many kinds (ValueError, NotImplementedError, ...)
            raise RFormatError(f"{what} is not a readable R serialisation ({err!r})") from err
    for warning in caught:  # e.g. "Wrong extension .rds for file in RDATA format"
        log.debug("rdata on %s: %s", what, warning.message)
    return value


def _entry_bytes(blob: bytes, compressed: int) -> bytes:
    """Decompress one lazy-load entry: 4-byte big-endian length, then (compression types 2/3)
    a type byte, then the compressed serialisation."""
    if len(blob) < 4:
        raise RFormatError("lazy-load entry shorter than its length header")
    size = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    try:
        if compressed in (2, 3):
            tag, body = body[:1], body[1:]
            decompress: dict[bytes, Callable[[bytes], bytes]] = {
                b"Z": zlib.decompress,
                b"2": bz2.decompress,
                b"X": lzma.decompress,
            }
            if tag == b"0":
                out = body
            elif tag in decompress:
                out = decompress[tag](body)
            else:
                raise RFormatError(f"unknown lazy-load compression tag {tag!r}")
        elif compressed == 1:
            out = zlib.decompress(body)
        else:
            out = body
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as err:
        raise RFormatError(f"cannot decompress lazy-load entry: {err}") from err
    if len(out) != size:
        raise RFormatError(f"lazy-load entry decompressed to {len(out)} bytes, expected {size}")
    return out


def _compression(index: dict[Any, Any]) -> int:
    """The index's ``compressed`` field as R's compression type (TRUE = 1 = zlib)."""
    value = index.get("compressed", True)
    if hasattr(value, "__len__") and not isinstance(value, str):
        value = value[0] if len(value) else True
    return int(value)


def read_lazyload_db(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database: name -> value as :func:`parse_rds`
    gives it. Raises :class:`RFormatError` (a :class:`~efficientllm.errors.DataError`) on a
    corrupt or unreadable database."""
    try:
        index_bytes, blob = rdx.read_bytes(), rdb.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read R lazy-load database {rdb}: {err}") from err
    index = parse_rds(index_bytes, what=str(rdx))
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise RFormatError(f"{rdx} is not an R lazy-load index")
    compressed = _compression(index)
    out: dict[str, Any] = {}
    for name, loc in variables.items():
        if not (hasattr(loc, "__len__") and len(loc) == 2):
            raise RFormatError(f"{rdx}: bad location for {name!r}")
        offset, length = int(loc[0]), int(loc[1])
        try:
            entry = _entry_bytes(blob[offset : offset + length], compressed)
        except RFormatError as err:
            raise RFormatError(f"{rdb}: variable {str(name)!r}: {err}") from err
        out[str(name)] = parse_rds(entry, what=f"{rdb}: variable {str(name)!r}")
        log.debug("read %s from %s", name, rdb)
    return out
