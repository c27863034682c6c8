"""Text in, deterministic packed token blocks out: read and validate every file, hold out whole
documents (never random lines), tokenise, pack, and sample resumable seeded batches."""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientllm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_SNIFF_BYTES = 8192
_MAX_CONTROL_SHARE = 0.1
_CONTROL = set(range(32)) - {9, 10, 12, 13} | {127}  # not tab, newline, form feed, CR
SINGLE_DOC_CHUNKS = 10
"""A lone document is cut into at most this many contiguous paragraph chunks before splitting."""


@dataclass(frozen=True)
class Document:
    """One unit of text; held-out splits never cut through a document."""

    name: str
    text: str


def _decode(path: Path) -> str:
    """Read ``path`` as UTF-8 text, refusing binary files before reading them whole."""
    with path.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
        raw = head + fh.read()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; remove it or give a file with text in it")
    if b"\x00" in head or sum(b in _CONTROL for b in head) > _MAX_CONTROL_SHARE * len(head):
        raise DataError(f"{path}: looks like a binary file, not text; give UTF-8 text files")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-save it as UTF-8") from None


def _text_doc(name: str, value: object, field: str) -> Document | None:
    """A document from one jsonl/parquet record value (None when blank)."""
    if value is not None and not isinstance(value, str):
        raise DataError(f"{name}: field {field!r} is not a string; store the text as a string")
    return Document(name, value) if value and value.strip() else None


def _read_records(path: Path, field: str) -> list[Document | None]:
    if path.suffix.lower() == ".jsonl":
        docs = []
        for lineno, line in enumerate(_decode(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"line {lineno} is not valid JSON ({err.msg}); write one object per line"
                raise DataError(f"{path}: {msg}") from None
            if not isinstance(record, dict) or field not in record:
                msg = f"line {lineno} has no field {field!r}; add it or set text_field"
                raise DataError(f"{path}: {msg}")
            docs.append(_text_doc(f"{path.name}:{lineno}", record[field], field))
        return docs
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: .parquet needs pyarrow; pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types
        raise DataError(f"{path}: cannot read as parquet ({err}); check the file") from None
    if field not in table.column_names:
        cols = ", ".join(table.column_names)
        raise DataError(f"{path}: no column {field!r} (has: {cols}); set text_field to one")
    values = table.column(field).to_pylist()
    return [_text_doc(f"{path.name}[{i}]", v, field) for i, v in enumerate(values)]


def _read_file(path: Path, name: str, text_field: str) -> list[Document]:
    if path.suffix.lower() in (".jsonl", ".parquet"):
        docs = [d for d in _read_records(path, text_field) if d is not None]
    else:
        docs = [Document(name, _decode(path))]
    if not docs:
        raise DataError(f"{path}: holds no text in {text_field!r}; remove it or fill it")
    return docs


def read_documents(paths: Sequence[str | Path], *, text_field: str = "text") -> list[Document]:
    """Read and validate .txt/.md/.jsonl/.parquet files and folders of them (recursive, sorted).

    A text file is one document named by its path relative to the folder given (or its file
    name); a jsonl line or parquet row is one document (``file:line`` / ``file[row]``).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given; pass at least one text file or folder")
    docs: list[Document] = []
    for given in map(Path, paths):
        if not given.exists():
            raise DataError(f"{given}: no such file or folder; check the path")
        if given.is_dir():
            rel = sorted(p.relative_to(given) for p in given.rglob("*") if p.is_file())
            rel = [
                r for r in rel if r.suffix.lower() in SUFFIXES and all(q[0] != "." for q in r.parts)
            ]
            if not rel:
                raise DataError(f"{given}: folder has no {'/'.join(SUFFIXES)} files; add some")
            for r in rel:  # hidden files and folders were skipped above
                docs += _read_file(given / r, r.as_posix(), text_field)
        else:
            docs += _read_file(given, given.name, text_field)
    if dupes := sorted(n for n, k in Counter(d.name for d in docs).items() if k > 1):
        raise DataError(f"{dupes[0]}: two documents have this name; give each a unique name")
    log.info("read %d documents, %d characters", len(docs), sum(len(d.text) for d in docs))
    return docs


def load_hub_dataset(
    name: str, *, split: str = "train", text_field: str = "text", max_documents: int | None = None
) -> list[Document]:
    """Stream documents of a hub dataset with the ``datasets`` library (imported lazily)."""
    try:
        import datasets
    except ImportError:
        msg = "hub datasets need the 'datasets' package; pip install datasets"
        raise DataError(f"{name}: {msg}, or use local text files") from None
    docs: list[Document] = []
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        for i, record in enumerate(stream):
            if max_documents is not None and len(docs) >= max_documents:
                break
            if isinstance(text := record.get(text_field), str) and text.strip():
                docs.append(Document(f"{name}[{i}]", text))
    except Exception as err:  # noqa: BLE001 - network/auth/missing errors vary by version
        msg = f"cannot load the hub dataset ({type(err).__name__}: {err})"
        raise DataError(f"{name}: {msg}; check name and network, or use local text files") from None
    if not docs:
        raise DataError(f"{name}: split {split!r} has no text in {text_field!r}; set text_field")
    return docs


def _chunk_document(doc: Document, n_chunks: int) -> list[Document]:
    """Cut one document into up to ``n_chunks`` contiguous runs of whole paragraphs."""
    paragraphs = [p for p in re.split(r"\n\s*\n", doc.text) if p.strip()]
    n = min(n_chunks, len(paragraphs))
    if n < 2:
        msg = "one document needs two or more blank-line separated paragraphs to hold some out"
        raise DataError(f"{doc.name}: {msg}; give more documents")
    bounds = [round(i * len(paragraphs) / n) for i in range(n + 1)]
    chunks = [paragraphs[bounds[i] : bounds[i + 1]] for i in range(n)]
    return [Document(f"{doc.name}#{i}", "\n\n".join(c)) for i, c in enumerate(chunks)]


def _aliases(name: str) -> set[str]:
    """Names that select a document: its own, without suffix, and for a record its file's."""
    source = re.sub(r"(?<=\.jsonl):\d+$|(?<=\.parquet)\[\d+\]$", "", name)
    return {name, source, Path(name).with_suffix("").as_posix(), Path(source).stem}


def split_documents(
    docs: Sequence[Document], *, heldout: float | Sequence[str], seed: int
) -> tuple[list[Document], list[Document]]:
    """Split into (train, held-out) by whole document, never by random lines.

    ``heldout`` is either a list of names (``"emma"`` or ``"emma.txt"``; a jsonl/parquet file
    name selects all its records) or a fraction of documents chosen with ``seed`` (at least
    one each side). A lone document is first cut into contiguous paragraph chunks
    (``SINGLE_DOC_CHUNKS``) and the chunks are split. Order within each side is kept.
    """
    docs = list(docs)
    if not docs:
        raise DataError("no documents to split; read some text first")
    if isinstance(heldout, str):
        heldout = [heldout]
    if isinstance(heldout, (int, float)):
        if not 0.0 < float(heldout) < 1.0:
            raise ConfigError(f"heldout fraction must be between 0 and 1, got {heldout}")
        if len(docs) == 1:
            docs = _chunk_document(docs[0], SINGLE_DOC_CHUNKS)
        n_held = min(len(docs) - 1, max(1, round(float(heldout) * len(docs))))
        held_idx = set(random.Random(seed).sample(range(len(docs)), n_held))
    else:
        wanted = set(heldout)
        held_idx = {i for i, d in enumerate(docs) if _aliases(d.name) & wanted}
        matched = set().union(*(_aliases(docs[i].name) for i in held_idx))
        if missing := sorted(wanted - matched):
            names = ", ".join(d.name for d in docs[:20])
            raise DataError(f"held-out names not found: {', '.join(missing)}; documents: {names}")
        if not held_idx or len(held_idx) == len(docs):
            raise DataError("the held-out names must leave at least one document on each side")
    train = [d for i, d in enumerate(docs) if i not in held_idx]
    held = [d for i, d in enumerate(docs) if i in held_idx]
    log.info("split: %d train documents, %d held-out", len(train), len(held))
    return train, held


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Any, *, add_bos: bool, eos_between: bool = True
) -> torch.Tensor:
    """Concatenate documents into one 1-D LongTensor token stream.

    Each text is encoded with ``add_special_tokens=False``; BOS is then put before every
    document when ``add_bos``, and EOS between consecutive documents when ``eos_between``.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if add_bos and bos is None:
        raise ConfigError("add_bos is set but the tokenizer has no BOS token; set add_bos=False")
    if eos_between and eos is None and len(docs) > 1:
        raise ConfigError("the tokenizer has no EOS token; set eos_between=False")
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eos_between:
            ids.append(eos)
        if add_bos:
            ids.append(bos)
        ids += tokenizer.encode(doc.text, add_special_tokens=False, verbose=False)
    if not ids:
        raise DataError("the documents produced no tokens; check the text")
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    """Cut a 1-D stream into ``[N, block_len]`` blocks; the ragged tail is dropped."""
    if block_len < 1:
        raise ConfigError(f"block_len must be at least 1, got {block_len}")
    if stream.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(stream.shape)}")
    n = stream.numel() // block_len
    if n == 0:
        msg = f"only {stream.numel()} tokens, fewer than one block of {block_len}"
        raise DataError(f"{msg}; add text or lower block_len")
    return stream[: n * block_len].reshape(n, block_len).clone()


class BlockSampler:
    """Endless seeded batches of blocks, reshuffled every epoch with ``seed + epoch``.

    An incomplete last batch of an epoch is skipped. ``state_dict()`` (JSON-serialisable)
    and ``load_state_dict()`` resume at exactly the same next batch.
    """

    def __init__(self, blocks: torch.Tensor, *, batch_size: int, seed: int):
        if blocks.dim() != 2:
            raise ValueError(f"expected [N, T] blocks, got shape {tuple(blocks.shape)}")
        if not 1 <= batch_size <= blocks.shape[0]:
            msg = f"batch_size must be 1..{blocks.shape[0]} (the number of blocks)"
            raise ConfigError(f"{msg}, got {batch_size}; add data or lower batch_size/block_len")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.epoch, self.position = 0, 0
        self.last_indices: list[int] = []
        """Block indices of the batch returned last (to log exactly which data was consumed)."""
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.blocks.shape[0] // self.batch_size

    def __iter__(self) -> BlockSampler:
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > self.blocks.shape[0]:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:  # this epoch's order, from the seed alone
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.blocks.shape[0], generator=gen)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        self.last_indices = idx.tolist()
        return self.blocks[idx]

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position; seed, batch_size and n_blocks are checked on load."""
        meta = {"seed": self.seed, "batch_size": self.batch_size, "n_blocks": len(self.blocks)}
        return {"epoch": self.epoch, "position": self.position, **meta}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "n_blocks"):
            if key in state and state[key] != mine[key]:
                msg = f"data state was saved with {key}={state[key]}, this run has {mine[key]}"
                raise ConfigError(f"{msg}; resume with the same data and settings")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
